"""The training timelapse: at the end of a run, and ``python -m wgan_lit.timelapse [run_dir=]RUN [key=value ...]``,
with one ``Error:`` line (exit code 2) and nothing written for every bad command line or run directory."""

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import assert_one_error, call, tiny_config
from wgan_lit.callbacks import SampleGrid, build_callbacks
from wgan_lit.timelapse import build_gif, find_frames, main


def timelapse_images(run: Path) -> list:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()  # every event file of it
    return acc.Images("timelapse") if "timelapse" in acc.Tags()["images"] else []


def test_a_run_ends_with_its_timelapse_as_a_gif_and_in_tensorboard(tiny_run):
    frames = find_frames(tiny_run)  # grids every 3 of 12 generator steps
    assert [step for step, _ in frames] == [0, 3, 6, 9, 12] and build_gif(tiny_run, max_frames=3)[1] == 3
    with Image.open(tiny_run / "timelapse.gif") as gif, Image.open(frames[0][1]) as grid:
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (grid.width, grid.height + 14)  # + caption
    assert len(images := timelapse_images(tiny_run)) == 1 and images[0].step == 12
    assert images[0].encoded_image_string[:6] == b"GIF89a"  # TensorBoard animates it


@pytest.mark.parametrize("on", [True, False])
def test_logger_timelapse_switches_it_at_the_end_of_training(tiny_model, tmp_path, on):
    cfg = tiny_config(tmp_path, 1, logger=dict(sample_every_n_gen_steps=1, timelapse=on))
    grids = [c for c in build_callbacks(cfg, tmp_path, None) if isinstance(c, SampleGrid)]
    grids[0].on_train_end(SimpleNamespace(is_global_zero=True, loggers=[]), tiny_model)
    assert [step for step, _ in find_frames(tmp_path)] == [0] and (tmp_path / "timelapse.gif").exists() == on


def test_help_lists_every_key_with_its_default(capsys):
    code, out, err = call(main, ["--help"], capsys)
    assert code == 0 and not err and re.findall(r"^  (\w+)=", out, re.M) == ["run_dir", "output", "fps", "tensorboard"]
    assert re.search(r"^  run_dir=\?\?\?  ", out, re.M) and re.search(r"^  fps=8\.0  ", out, re.M) and "usage" in out


def test_the_command_writes_where_asked_or_into_the_run_and_its_tensorboard_log(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    [shutil.copytree(tiny_run / part, run / part) for part in ("samples", "tensorboard")]  # not its checkpoints
    out = tmp_path / "sub" / "t.gif"
    code, stdout, err = call(main, [f"run_dir={run}", f"output={out}", "fps=4", "tensorboard=false"], capsys)
    assert code == 0 and f"Wrote {out}" in stdout and len(timelapse_images(run)) == 1, err  # the log left alone
    with Image.open(out) as gif:
        assert gif.format == "GIF" and gif.n_frames == 5 and gif.info["duration"] == 250
    assert call(main, [str(run)], capsys)[0] == 0  # the run directory alone: run_dir=, to RUN/timelapse.gif
    with Image.open(run / "timelapse.gif") as gif:
        assert gif.n_frames == 5 and abs(gif.info["duration"] - 125) <= 10  # fps=8; GIF stores centiseconds
    assert len(images := timelapse_images(run)) == 2 and images[-1].step == 12
    assert images[-1].encoded_image_string == (run / "timelapse.gif").read_bytes() != out.read_bytes()


@pytest.mark.parametrize(("bad", "good", "parts"), [
    pytest.param(["no_tensorboard=true"], ["tensorboard=false"], ["'no_tensorboard'", "TimelapseConfig"], id="key"),
    pytest.param(["fps=fast"], ["fps=4"], ["fps=fast", "Float"], id="wrong-type-float"),
    pytest.param(["tensorboard=maybe"], ["tensorboard=false"], ["tensorboard=maybe"], id="wrong-type-bool"),
    pytest.param(["fps=0"], ["fps=0.5"], ["fps=0.0: expected a number > 0"], id="bad-value-fps"),
    pytest.param(["run_dir=nowhere"], [], ["run_dir='nowhere': expected an existing training run's"], id="run-dir"),
    pytest.param(["run_dir=."], [], ["samples: no sample grids", "logger.sample_every_n_gen_steps"], id="no-grids"),
    pytest.param(["output=/dev/null/x.gif"], [], ["output='/dev/null/x.gif': cannot be written"], id="unwritable"),
    pytest.param(["nowhere"], [], ["'nowhere': expected key=value", "timelapse run_dir=nowhere"], id="bare-path")])
def test_a_bad_value_is_one_error_line_the_right_one_works(tiny_run, tmp_path, monkeypatch, capsys, bad, good, parts):
    monkeypatch.chdir(tmp_path)
    args = [f"run_dir={tiny_run}", "output=out.gif", "tensorboard=false"]
    assert_one_error(*call(main, [*args, *bad], capsys), *parts)
    assert list(tmp_path.iterdir()) == []  # nothing written
    code, out, err = call(main, [*args, *good], capsys)
    assert code == 0 and "Wrote out.gif" in out and [p.name for p in tmp_path.iterdir()] == ["out.gif"], err
