"""The training timelapse (end of run and command) and notebooks/explore_run.ipynb run top to bottom."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, write_fake_fashion_mnist
from tests.test_resume import tiny_config
from wgan_lit.timelapse import find_frames, main
from wgan_lit.train import train


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nb")
    cfg = tiny_config(write_fake_fashion_mnist(tmp / "data", n_train=64), 4)
    cfg.logger.sample_every_n_gen_steps = 1
    train(cfg, tmp / "run")
    return tmp / "run"


def test_a_run_ends_with_its_timelapse_as_a_gif_and_in_tensorboard(run):
    frames = find_frames(run)
    assert [step for step, _ in frames] == [0, 1, 2, 3, 4]
    gif = Image.open(run / "timelapse.gif")
    assert gif.n_frames == 5
    assert gif.size[0] == Image.open(frames[0][1]).size[0]  # the grid, plus a caption strip below
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert "timelapse" in acc.Tags()["images"]
    assert acc.Images("timelapse")[-1].encoded_image_string[:6] == b"GIF89a"  # TensorBoard animates it


def test_the_timelapse_command_over_a_run_directory(run, tmp_path, capsys):
    out = tmp_path / "t.gif"
    assert main([str(run), "--output", str(out), "--fps", "4", "--no-tensorboard"]) == 0
    assert Image.open(out).n_frames == 5 and Image.open(out).info["duration"] == 250
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no sample grids" in capsys.readouterr().err


def test_the_timelapse_is_off_with_the_switch(tmp_path):
    cfg = tiny_config(write_fake_fashion_mnist(tmp_path / "data", n_train=64), 1)
    cfg.logger.timelapse = False
    train(cfg, tmp_path / "run")
    assert find_frames(tmp_path / "run") and not (tmp_path / "run" / "timelapse.gif").exists()


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
    nbclient.NotebookClient(nb, timeout=300, kernel_name="wgan-test",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"run: {run}" in text and "generator step 4" in text
    mimes = [m for o in outputs for m in o.get("data", {})]
    assert mimes.count("image/png") == 3 and "image/gif" in mimes  # samples, curves, interpolation, timelapse
