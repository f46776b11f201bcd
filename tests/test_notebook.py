"""notebooks/explore_run.ipynb runs top to bottom on a tiny run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_config, write_fake_fashion_mnist
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
    import nbclient
    import nbformat

    # A kernel spec of this very interpreter, so a system-wide "python3" kernel cannot be picked instead.
    spec = tmp_path / "jupyter" / "kernels" / "wgan-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "wgan-test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("WGAN_RUN_DIR", str(run))

    nb = nbformat.read(REPO / "notebooks" / "explore_run.ipynb", as_version=4)
    for cell in nb.cells:  # the committed outputs are a real run's: these must come from this execution
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=300, kernel_name="wgan-test",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"run: {run}" in text and "generator step 4" in text
    mimes = [m for o in outputs for m in o.get("data", {})]
    assert mimes.count("image/png") == 4  # samples, curves, interpolation, timelapse grids
    assert "5 grids, generator steps 0 to 4" in text  # every generator step of the tiny run
