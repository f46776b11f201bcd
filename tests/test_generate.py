"""python -m wgan_lit.generate: grids, raw tensors streamed in batches, seeds, interpolations, e089f38 checkpoints,
and one ``Error:`` line (exit code 2) with nothing written for every bad command line or file."""

import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import LEGACY_CKPT, LEGACY_EMA_CKPT, assert_one_error, call, run_cli
from wgan_lit import generate as gen
from wgan_lit.generate import GenerateConfig, main, slerp
from wgan_lit.module import WGAN

npz = lambda path: np.load(path)["samples"]  # noqa: E731


def test_help_lists_every_key_with_its_default(capsys):
    code, out, err = call(main, ["--help"], capsys)
    assert code == 0 and err == "" and "usage: python -m wgan_lit.generate key=value" in out
    assert re.findall(r"^  (\w+)=", out, re.M) == [f.name for f in dataclasses.fields(GenerateConfig)]
    assert all(re.search(rf"^  {k}  ", out, re.M) for k in (r"checkpoint=\?\?\?", "batch_size=500", r"interpolate=\[]"))


@pytest.mark.parametrize(("args", "output", "cols", "rows"), [
    ([], "samples.png", 8, 8), (["n=9", "output=grid.png"], "grid.png", 3, 3),  # the default: 64, sqrt(n) per row
    (["n=6", "nrow=3", "output=sub/rows.png"], "sub/rows.png", 3, 2)])  # the output's folder is made
def test_a_png_grid_has_nrow_columns(tmp_path, monkeypatch, capsys, args, output, cols, rows):
    monkeypatch.chdir(tmp_path)
    code, out, err = call(main, [f"checkpoint={LEGACY_CKPT}", *args], capsys)
    assert code == 0 and f"Wrote {output}" in out, err
    with Image.open(output) as im:  # 28-pixel images, padding 2
        assert im.format == "PNG" and im.size == (cols * 28 + (cols + 1) * 2, rows * 28 + (rows + 1) * 2)


def test_raw_samples_are_the_seeds_codes_streamed_in_batches(tmp_path, monkeypatch, capsys):
    seen, sample, ckpt, key = [], WGAN.sample, LEGACY_CKPT, f"checkpoint={LEGACY_CKPT}"
    monkeypatch.setattr(WGAN, "sample", lambda self, z, size, ema=True: (
        seen.append(len(part)) or part for part in sample(self, z, size, ema)))  # lazy: as the writer takes them
    for name, *args in [("s.npz", key, "seed=5", "batch_size=8"), ("s.pt", key, "seed=5", "batch_size=37"),
                        ("again.npz", str(ckpt), "seed=5", "batch_size=8")]:  # the checkpoint alone: checkpoint=
        assert call(main, [*args, "n=37", "device=cpu", f"output={tmp_path / name}"], capsys)[0] == 0
    gen.generate(ckpt, 37, tmp_path / "other.npz", seed=6, batch_size=2, device="cpu", nrow=None)  # the function
    assert seen[:5] == [8, 8, 8, 8, 5] and seen[-19:] == [2] * 18 + [1]  # one batch at a time: never all of n in flight
    a, b = npz(tmp_path / "s.npz"), torch.load(tmp_path / "s.pt", weights_only=True)
    assert list(np.load(tmp_path / "s.npz").keys()) == ["samples"]
    assert a.shape == (37, 1, 28, 28) and a.dtype == np.float32 and b.shape == a.shape and b.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0 and np.allclose(a, b.numpy(), atol=1e-5)  # the same codes
    assert np.array_equal(npz(tmp_path / "again.npz"), a) and not np.allclose(npz(tmp_path / "other.npz"), a)
    assert (model := gen.load_generator(ckpt, "cpu")).gen_step == 6 and not model.training
    codes = torch.randn(37, 8, generator=torch.Generator().manual_seed(5))  # randn(n, latent_dim) of the seed, on CPU
    assert np.allclose(a, model.generate(codes).clamp(-1, 1).numpy(), atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.npz", "other.npz", "s.npz", "s.pt"]  # no temporaries


def test_interpolation_as_gif_row_and_tensor_from_seed_a_to_seed_b(tiny_run, tmp_path, capsys):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"  # today's format, with an averaged generator
    for name, *args in [("walk.gif", "fps=4"), ("walk.png",)]:
        walk = [f"checkpoint={ckpt}", "interpolate=[3,7]", "steps=6", *args, f"output={tmp_path / name}"]
        assert call(main, walk, capsys)[0] == 0
    gen.interpolate(ckpt, 3, 7, tmp_path / "walk.npz", steps=6, device="cpu", fps=8.0)  # the Python function
    with Image.open(tmp_path / "walk.gif") as im:
        assert im.format == "GIF" and im.n_frames == 6 + 4  # forward, then back without repeating the ends
        assert im.info["duration"] == 250 and im.size == (140, 140)  # fps=4; 28 pixels enlarged 5x to >= 128
    assert Image.open(tmp_path / "walk.png").size == (6 * 28 + 7 * 2, 28 + 2 * 2)  # one row
    path, model = npz(tmp_path / "walk.npz"), gen.load_generator(ckpt, "cpu")
    assert path.shape == (6, 1, 28, 28) and path.min() >= -1 and path.max() <= 1
    for image, seed in ((path[0], 3), (path[-1], 7)):  # the walk starts at seed 3's sample and ends at seed 7's
        assert np.allclose(image, next(model.sample(model.latents(1, seed), 1)).numpy()[0], atol=1e-4)
    assert not np.allclose(path[0], path[-1], atol=1e-3)
    a, b = torch.randn(16), torch.randn(16)  # slerp: from a to b; between parallel codes, the line
    assert torch.allclose(slerp(a, b, 5)[[0, -1]], torch.stack([a, b]), atol=1e-5) and slerp(a, b, 5).shape == (5, 16)
    assert torch.allclose(slerp(a, 2 * a, 3)[1], 1.5 * a)
    with pytest.raises(ValueError, match="x.jpg"):
        gen.generate(ckpt, 4, tmp_path / "x.jpg")


BAD_PATH = ["'foo.ckpt': expected key=value", "python -m wgan_lit.generate checkpoint=foo.ckpt"]


@pytest.mark.parametrize(("bad", "good", "fragments"), [
    pytest.param(["nn=9"], ["n=9"], ["'nn'", "not in 'GenerateConfig'"], id="unknown-key"),
    pytest.param(["n=abc"], ["n=4"], ["n=abc", "Integer"], id="wrong-type-int"),
    pytest.param(["fps=fast", "interpolate=[1,2]"], ["fps=2.5", "interpolate=[1,2]"], ["fps=fast"], id="wrong-float"),
    pytest.param(["interpolate=3"], ["interpolate=[3,4]"], ["interpolate=3"], id="wrong-type-list"),
    pytest.param(["n=0"], ["n=1"], ["n=0: expected an integer >= 1"], id="bad-value-n"),
    pytest.param(["batch_size=0"], ["batch_size=1"], ["batch_size=0: expected an integer >= 1"], id="bad-batch-size"),
    pytest.param(["nrow=-1"], ["nrow=2"], ["nrow=-1"], id="bad-value-nrow"),
    pytest.param(["interpolate=[3]"], ["interpolate=[3,3]"], ["interpolate=[3]", "two seeds"], id="bad-interpolate"),
    pytest.param(["interpolate=[1,2]", "steps=1"], ["interpolate=[1,2]", "steps=2"], ["steps=1"], id="bad-value-steps"),
    pytest.param(["interpolate=[1,2]", "fps=0"], ["interpolate=[1,2]", "fps=1"], ["fps=0.0"], id="bad-value-fps"),
    pytest.param(["device=tpu"], ["device=cpu"], ["device='tpu'", "auto, cpu, cuda"], id="bad-value-device"),
    pytest.param(["output=out.jpg"], ["output=out.npz"], ["out.jpg", "expected a .png, .pt or .npz"], id="bad-suffix"),
    pytest.param(["output=out.gif"], ["output=out.gif", "interpolate=[1,2]"], ["interpolate=[A,B]"], id="gif-alone"),
    pytest.param([], [f"checkpoint={LEGACY_CKPT}"], ["checkpoint", "write checkpoint=VALUE"], id="no-checkpoint"),
    pytest.param([f"checkpoint={LEGACY_CKPT}", "--output", "x.png"], [f"checkpoint={LEGACY_CKPT}"], [], id="option"),
    pytest.param(["foo.ckpt"], [str(LEGACY_CKPT)], BAD_PATH, id="no-such-path"),
    pytest.param([str(LEGACY_CKPT), "foo.ckpt"], [str(LEGACY_CKPT)], BAD_PATH, id="second-path")])
def test_a_bad_value_is_one_error_line_and_the_right_one_works(tmp_path, monkeypatch, capsys, bad, good, fragments):
    monkeypatch.chdir(tmp_path)
    args = [f"checkpoint={LEGACY_CKPT}"] * all("ckpt" not in a for a in bad + good) + ["n=4", "steps=3", "output=o.png"]
    assert_one_error(*call(main, [*args, *bad], capsys), *fragments)
    assert list(tmp_path.iterdir()) == []  # refused before any work
    code, out, err = call(main, [*args, *good], capsys)
    assert code == 0 and "Wrote" in out and len(list(tmp_path.iterdir())) == 1, err


def test_device_cuda_gives_the_cpu_samples_or_one_error_naming_device_cpu(tmp_path, capsys):
    args = [f"checkpoint={LEGACY_EMA_CKPT}", "n=16", f"output={tmp_path}/cuda.npz", "device=cuda"]
    if not torch.cuda.is_available():
        assert_one_error(*call(main, args, capsys), "no CUDA device is visible", "device=cpu")
    else:  # the same codes on any device: drawn on the CPU
        assert call(main, args, capsys)[0] == call(main, [*args[:2], f"output={tmp_path}/cpu.npz"], capsys)[0] == 0
        assert np.allclose(npz(tmp_path / "cuda.npz"), npz(tmp_path / "cpu.npz"), atol=1e-3)
    assert len(list(tmp_path.iterdir())) == 2 * torch.cuda.is_available()  # without a GPU: nothing written


@pytest.mark.parametrize(("make", "fragment"), [  # make(bad.ckpt, the good checkpoint) -> the checkpoint to pass
    (lambda p, c: p, "{p}: no such file"), (lambda p, c: (p.mkdir(), p)[1], "{p}: is a folder"),
    (lambda p, c: (p.write_bytes(b""), p)[1], "{p}: the file is empty"),
    (lambda p, c: (p.write_bytes(b"not a checkpoint"), p)[1], "{p}: not a PyTorch checkpoint"),
    (lambda p, c: (p.write_bytes(c.read_bytes()[:5000]), p)[1], "truncated or corrupt"),
    (lambda p, c: (torch.save({**(b := torch.load(c, weights_only=True)), "hyper_parameters": {  # of a later version
        **b["hyper_parameters"], "setting_of_a_later_version": 1}}, p), p)[1], "{p}: does not fit this version's WGAN"),
    (lambda p, c: ((p.parent / "out").write_bytes(b""), c)[1], "output='{o}': cannot be written")])  # a file in the way
def test_a_bad_checkpoint_or_output_is_one_message_naming_it(tmp_path, capsys, make, fragment):
    bad, out = tmp_path / "bad.ckpt", tmp_path / "out" / "x.png"
    checkpoint, before = make(bad, LEGACY_CKPT), list(tmp_path.iterdir())
    assert_one_error(*call(main, [f"checkpoint={checkpoint}", f"output={out}"], capsys), fragment.format(p=bad, o=out))
    assert list(tmp_path.iterdir()) == before  # nothing written, no temporary left


@pytest.mark.parametrize("legacy", [LEGACY_CKPT, LEGACY_EMA_CKPT], ids=["plain", "averaged"])
def test_a_checkpoint_of_e089f38_loads_with_its_runtime_switches_dropped(legacy, tmp_path, capsys):
    blob = torch.load(legacy, map_location="cpu", weights_only=True)  # runtime switches among its hyperparameters
    torch.save({**blob, "hyper_parameters": {**blob["hyper_parameters"], "compile": True}}, tmp_path / "compile.ckpt")
    for name in (legacy, tmp_path / "compile.ckpt"):
        assert call(main, [f"checkpoint={name}", "n=4", "seed=3", f"output={tmp_path / name.stem}.pt"], capsys)[0] == 0
    z = (model := gen.load_generator(tmp_path / "compile.ckpt", "cpu")).latents(4, 3)
    assert not model.runtime.compile and not {"compile", "channels_last", "fused_clamp"} & set(model.hparams)
    samples = torch.load(tmp_path / f"{legacy.stem}.pt")
    assert torch.equal(samples, torch.load(tmp_path / "compile.pt")) and torch.equal(samples, next(model.sample(z, 4)))
    assert (model.generator_ema is not None) == (legacy == LEGACY_EMA_CKPT)  # sampled from the average when it has one
    assert torch.allclose(samples, next(model.sample(z, 4, ema=False))) == (model.generator_ema is None)


def test_the_module_entry_point_exits_2_with_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    bad = run_cli(["-m", "wgan_lit.generate", "checkpoint=empty.ckpt", "n=5", "output=s.pt"], cwd=tmp_path, check=False)
    assert (bad.returncode, bad.stdout, [p.name for p in tmp_path.iterdir()]) == (2, "", ["empty.ckpt"]), bad.stderr
    assert bad.stderr.startswith("Error: checkpoint empty.ckpt: the file is empty") and bad.stderr.count("\n") == 1
