"""The training timelapse: at the end of a run, and ``python -m wgan_lit.timelapse run_dir=RUN [key=value ...]``
over a run directory, with one ``Error:`` line (exit code 2) for every bad command line or run directory."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import assert_one_error, call, run_cli, tiny_config, write_fake_fashion_mnist
from wgan_lit.timelapse import TimelapseConfig, find_frames, main
from wgan_lit.train import train


def timelapse_images(run: Path) -> list:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()  # every event file of the folder
    return acc.Images("timelapse") if "timelapse" in acc.Tags()["images"] else []


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run with a sample grid at every generator step 0..4 (do not modify: copy it)."""
    tmp = tmp_path_factory.mktemp("timelapse")
    data = write_fake_fashion_mnist(tmp / "fmnist")
    train(tiny_config(data, 4, logger=dict(sample_every_n_gen_steps=1)), tmp / "run")
    return tmp / "run"


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


# ---- at the end of training --------------------------------------------------------------------------


def test_a_run_ends_with_its_timelapse_as_a_gif_and_in_tensorboard(run):
    frames = find_frames(run)
    assert [step for step, _ in frames] == [0, 1, 2, 3, 4]
    with Image.open(run / "timelapse.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 5
        grid = Image.open(frames[0][1]).size
        assert gif.size == (grid[0], grid[1] + 14)  # the grid, plus a caption strip below
    images = timelapse_images(run)
    assert images and images[-1].step == 4
    assert images[-1].encoded_image_string[:6] == b"GIF89a"  # TensorBoard animates it


def test_the_timelapse_is_off_with_the_switch(tmp_path):
    cfg = tiny_config(write_fake_fashion_mnist(tmp_path / "fmnist", n_train=64), 1, logger=dict(timelapse=False))
    train(cfg, tmp_path / "run")
    assert find_frames(tmp_path / "run") and not (tmp_path / "run" / "timelapse.gif").exists()


# ---- the command -------------------------------------------------------------------------------------


def test_help_lists_every_key_and_exits_0(capsys):
    code, out, err = call(main, ["--help"], capsys)
    assert code == 0 and err == ""
    assert "usage: python -m wgan_lit.timelapse key=value" in out
    for f in dataclasses.fields(TimelapseConfig):
        assert re.search(rf"^  {f.name}=", out, re.M), f.name
    assert re.search(r"^  run_dir=\?\?\?  ", out, re.M) and re.search(r"^  fps=8\.0  ", out, re.M)


def test_the_command_writes_the_gif_where_asked_at_the_fps_asked(run_copy, tmp_path, capsys):
    before = len(timelapse_images(run_copy))
    out = tmp_path / "sub" / "t.gif"
    code, stdout, err = call(main, [f"run_dir={run_copy}", f"output={out}", "fps=4", "tensorboard=false"], capsys)
    assert code == 0 and f"Wrote {out}" in stdout, err
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.info["duration"] == 250
    assert len(timelapse_images(run_copy)) == before  # tensorboard=false: the log is left alone


def test_the_defaults_rewrite_run_dir_timelapse_gif_and_add_it_to_tensorboard(run_copy, capsys):
    (run_copy / "timelapse.gif").unlink()
    before = len(timelapse_images(run_copy))
    code, stdout, err = call(main, [f"run_dir={run_copy}"], capsys)
    assert code == 0, err
    with Image.open(run_copy / "timelapse.gif") as gif:
        assert gif.n_frames == 5 and abs(gif.info["duration"] - 125) <= 10  # fps=8; GIF stores centiseconds
    images = timelapse_images(run_copy)
    assert len(images) == before + 1 and images[-1].step == 4
    assert images[-1].encoded_image_string == (run_copy / "timelapse.gif").read_bytes()


@pytest.mark.parametrize(
    ("bad", "good", "fragments"),
    [
        pytest.param(["no_tensorboard=true"], ["tensorboard=false"], ["'no_tensorboard'", "TimelapseConfig"],
                     id="unknown-key"),
        pytest.param(["fps=fast"], ["fps=4"], ["fps=fast", "Float"], id="wrong-type-float"),
        pytest.param(["tensorboard=maybe"], ["tensorboard=false"], ["tensorboard=maybe"], id="wrong-type-bool"),
        pytest.param(["fps=0"], ["fps=0.5"], ["fps=0.0: expected a number > 0"], id="bad-value-fps"),
        pytest.param(["run_dir=nowhere"], [], ["run_dir='nowhere': no such directory"], id="bad-value-run-dir"),
    ],
)
def test_bad_value_is_one_error_line_and_the_right_one_works(run, tmp_path, monkeypatch, capsys, bad, good,
                                                            fragments):
    monkeypatch.chdir(tmp_path)
    args = [f"run_dir={run}", "output=out.gif", "tensorboard=false"]
    assert_one_error(*call(main, [*args, *bad], capsys), *fragments)
    assert list(tmp_path.iterdir()) == []  # refused before any work
    code, out, err = call(main, [*args, *good], capsys)
    assert code == 0, err
    assert Image.open(tmp_path / "out.gif").n_frames == 5


def test_missing_run_dir_key_and_the_old_spelling_are_one_error_line(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_one_error(*call(main, ["output=out.gif"], capsys), "run_dir", "write run_dir=VALUE")
    assert_one_error(*call(main, [f"run_dir={run}", "--no-tensorboard"], capsys))
    assert_one_error(*call(main, ["nowhere", "output=out.gif"], capsys), "'nowhere': expected key=value",
                     "python -m wgan_lit.timelapse run_dir=nowhere")
    assert_one_error(*call(main, [str(run), str(run), "output=out.gif"], capsys),
                     f"python -m wgan_lit.timelapse run_dir={run}")  # a second path
    assert list(tmp_path.iterdir()) == []
    assert call(main, [f"run_dir={run}", "output=out.gif", "tensorboard=false"], capsys)[0] == 0


def test_the_run_directory_alone_is_run_dir_path(run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = call(main, [str(run), "output=alone.gif", "tensorboard=false"], capsys)
    assert code == 0 and "Wrote alone.gif" in out, err
    assert call(main, [f"run_dir={run}", "output=key.gif", "tensorboard=false"], capsys)[0] == 0
    assert (tmp_path / "alone.gif").read_bytes() == (tmp_path / "key.gif").read_bytes()


def test_a_run_without_grids_or_an_unwritable_output_is_one_error_line(run, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_error(*call(main, [f"run_dir={empty}"], capsys), "no sample grids", str(empty / "samples"))
    assert list(empty.iterdir()) == []
    folder = tmp_path / "a_folder.gif"
    folder.mkdir()
    assert_one_error(*call(main, [f"run_dir={run}", f"output={folder}", "tensorboard=false"], capsys),
                     "cannot be written")


@pytest.mark.slow
def test_the_module_entry_point(run, tmp_path):
    def command(*args: str) -> subprocess.CompletedProcess:
        return run_cli(["-m", "wgan_lit.timelapse", *args], cwd=tmp_path, check=False)

    bad = command(f"run_dir={run}", "fps=-2")
    assert bad.returncode == 2 and bad.stderr.startswith("Error: fps=-2.0: expected a number > 0"), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    good = command(f"run_dir={run}", "output=t.gif", "fps=2", "tensorboard=false")
    assert good.returncode == 0, good.stderr[-3000:]
    with Image.open(tmp_path / "t.gif") as gif:
        assert gif.n_frames == 5 and gif.info["duration"] == 500
