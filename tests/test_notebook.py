"""notebooks/explore_run.ipynb runs top to bottom on a tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import execute_notebook, tiny_config, write_fake_fashion_mnist
from wgan_lit.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nb")
    cfg = tiny_config(write_fake_fashion_mnist(tmp / "data", n_train=64), 4)
    cfg.logger.sample_every_n_gen_steps = 1
    train(cfg, tmp / "run")
    return tmp / "run"


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_on_a_tiny_run(run, tmp_path, monkeypatch):
    outputs = execute_notebook("explore_run.ipynb", tmp_path, monkeypatch, WGAN_RUN_DIR=str(run))
    text = "".join(o.get("text", "") for o in outputs)
    assert f"run: {run}" in text and "generator step 4" in text
    mimes = [m for o in outputs for m in o.get("data", {})]
    assert mimes.count("image/png") == 4  # samples, curves, interpolation, timelapse grids
    assert "5 grids, generator steps 0 to 4" in text  # every generator step of the tiny run
