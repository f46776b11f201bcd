"""python -m wgan_lit.generate: key=value overrides, grids, raw tensors streamed in batches, seeds,
interpolations, and one ``Error:`` line (exit code 2) for every bad command line or file."""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import assert_one_error, call, run_cli, tiny_config, write_fake_fashion_mnist
from wgan_lit import generate as gen
from wgan_lit.generate import GenerateConfig, main, slerp
from wgan_lit.module import WGAN
from wgan_lit.train import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gen")
    train(tiny_config(write_fake_fashion_mnist(tmp / "fmnist"), 4, logger={}), tmp / "run")
    return tmp / "run" / "checkpoints" / "last.ckpt"


# ---- --help ------------------------------------------------------------------------------------------


def test_help_lists_every_key_with_its_default_and_exits_0(capsys):
    code, out, err = call(main, ["--help"], capsys)
    assert code == 0 and err == ""
    assert "usage: python -m wgan_lit.generate key=value" in out
    for f in dataclasses.fields(GenerateConfig):
        assert re.search(rf"^  {f.name}=", out, re.M), f.name
    assert re.search(r"^  checkpoint=\?\?\?  ", out, re.M)
    assert re.search(r"^  batch_size=500  ", out, re.M) and re.search(r"^  interpolate=\[\]  ", out, re.M)


# ---- good calls --------------------------------------------------------------------------------------


def test_defaults_write_a_square_grid_of_64_to_samples_png(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, _ = call(main, [f"checkpoint={ckpt}"], capsys)
    assert code == 0 and "Wrote samples.png" in out
    with Image.open(tmp_path / "samples.png") as im:
        assert im.format == "PNG" and im.size == (8 * 28 + 9 * 2, 8 * 28 + 9 * 2)  # 8 x 8 images, padding 2


def test_png_grid_size_follows_n_and_nrow(ckpt, tmp_path, capsys):
    square, rows = tmp_path / "grid.png", tmp_path / "sub" / "rows.png"
    assert call(main, [f"checkpoint={ckpt}", "n=9", f"output={square}"], capsys)[0] == 0
    assert Image.open(square).size == (3 * 28 + 4 * 2, 3 * 28 + 4 * 2)  # nrow=0: sqrt(9) = 3 per row
    assert call(main, [f"checkpoint={ckpt}", "n=6", "nrow=3", f"output={rows}"], capsys)[0] == 0
    assert Image.open(rows).size == (3 * 28 + 4 * 2, 2 * 28 + 3 * 2)  # the output's folder is made


def test_raw_samples_are_n_c_h_w_in_range_streamed_in_batches_and_seeded(ckpt, tmp_path, monkeypatch, capsys):
    seen: list[int] = []
    real = WGAN.generate

    def spy(self, z):
        seen.append(len(z))
        return real(self, z)

    monkeypatch.setattr(WGAN, "generate", spy)
    npz, pt = tmp_path / "s.npz", tmp_path / "s.pt"
    base = [f"checkpoint={ckpt}", "n=37", "seed=5", "device=cpu"]
    assert call(main, [*base, "batch_size=8", f"output={npz}"], capsys)[0] == 0
    assert seen == [8, 8, 8, 8, 5]  # never more than one batch in flight
    # another batch size and format: the same codes, so the same images up to float rounding
    assert call(main, [*base, "batch_size=37", f"output={pt}"], capsys)[0] == 0
    with np.load(npz) as f:
        assert list(f.keys()) == ["samples"]
        a = f["samples"]
    b = torch.load(pt, weights_only=True)
    assert a.shape == (37, 1, 28, 28) and a.dtype == np.float32
    assert b.shape == (37, 1, 28, 28) and b.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0
    assert np.allclose(a, b.numpy(), atol=1e-5)
    again = tmp_path / "again.npz"
    assert call(main, [*base, "batch_size=8", f"output={again}"], capsys)[0] == 0
    assert np.array_equal(np.load(again)["samples"], a)  # same seed, same batch size: identical
    other = tmp_path / "other.npz"
    assert call(main, [f"checkpoint={ckpt}", "n=37", "seed=6", f"output={other}"], capsys)[0] == 0
    assert not np.allclose(np.load(other)["samples"], a)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".buffer-" in p.name] == []


def test_interpolation_as_gif_row_and_tensor_from_seed_a_to_seed_b(ckpt, tmp_path, capsys):
    gif, png, npz = tmp_path / "walk.gif", tmp_path / "walk.png", tmp_path / "walk.npz"
    walk = [f"checkpoint={ckpt}", "interpolate=[3,7]", "steps=6"]
    assert call(main, [*walk, f"output={gif}", "fps=4"], capsys)[0] == 0
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 6 + 4  # forward, then back without repeating the ends
        assert im.info["duration"] == 250  # fps=4
    assert call(main, [*walk, f"output={png}"], capsys)[0] == 0
    assert Image.open(png).size == (6 * 28 + 7 * 2, 28 + 2 * 2)
    assert call(main, [*walk, f"output={npz}"], capsys)[0] == 0
    path = np.load(npz)["samples"]
    assert path.shape == (6, 1, 28, 28) and path.min() >= -1 and path.max() <= 1
    ends = []
    for seed in (3, 7):  # the walk starts at seed 3's sample and ends at seed 7's
        one = tmp_path / f"seed{seed}.npz"
        assert call(main, [f"checkpoint={ckpt}", "n=1", f"seed={seed}", f"output={one}"], capsys)[0] == 0
        ends.append(np.load(one)["samples"][0])
    assert np.allclose(path[0], ends[0], atol=1e-4) and np.allclose(path[-1], ends[1], atol=1e-4)
    assert not np.allclose(path[0], path[-1], atol=1e-3)


def test_slerp_ends_at_both_codes():
    a, b = torch.randn(16), torch.randn(16)
    path = slerp(a, b, 5)
    assert path.shape == (5, 16)
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)


def test_python_functions_keep_their_signatures(ckpt, tmp_path):
    model = gen.load_generator(ckpt, device="cpu")
    assert model.gen_step == 4 and not model.training
    out = gen.generate(ckpt, 4, tmp_path / "a.npz", seed=1, batch_size=2, device="cpu", nrow=None)
    assert np.load(out)["samples"].shape == (4, 1, 28, 28)
    out = gen.interpolate(ckpt, 1, 2, tmp_path / "b.pt", steps=3, device="cpu", fps=8.0)
    assert torch.load(out, weights_only=True).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="x.jpg"):
        gen.generate(ckpt, 4, tmp_path / "x.jpg")


# ---- bad command lines: one Error line, exit code 2, nothing written; the right value works ------------

OUT = "out.png"  # relative to the test's tmp_path (the cwd)


@pytest.mark.parametrize(
    ("bad", "good", "fragments"),
    [
        pytest.param(["nn=9"], ["n=9"], ["'nn'", "not in 'GenerateConfig'"], id="unknown-key"),
        pytest.param(["n=abc"], ["n=4"], ["n=abc", "Integer"], id="wrong-type-int"),
        pytest.param(["fps=fast", "interpolate=[1,2]"], ["fps=2.5", "interpolate=[1,2]"], ["fps=fast"],
                     id="wrong-type-float"),
        pytest.param(["interpolate=3"], ["interpolate=[3,4]"], ["interpolate=3"], id="wrong-type-list"),
        pytest.param(["n=0"], ["n=1"], ["n=0: expected an integer >= 1"], id="bad-value-n"),
        pytest.param(["batch_size=0"], ["batch_size=1"], ["batch_size=0: expected an integer >= 1"],
                     id="bad-value-batch-size"),
        pytest.param(["nrow=-1"], ["nrow=2"], ["nrow=-1"], id="bad-value-nrow"),
        pytest.param(["interpolate=[3]"], ["interpolate=[3,3]"], ["interpolate=[3]", "two seeds"],
                     id="bad-value-interpolate"),
        pytest.param(["interpolate=[1,2]", "steps=1"], ["interpolate=[1,2]", "steps=2"], ["steps=1"],
                     id="bad-value-steps"),
        pytest.param(["interpolate=[1,2]", "fps=0"], ["interpolate=[1,2]", "fps=1"], ["fps=0.0"],
                     id="bad-value-fps"),
        pytest.param(["device=tpu"], ["device=cpu"], ["device='tpu'", "auto, cpu, cuda"], id="bad-value-device"),
        pytest.param(["output=out.jpg"], ["output=out.npz"], ["out.jpg", "expected a .png, .pt or .npz"],
                     id="bad-output-suffix"),
        pytest.param(["output=out.gif"], ["output=out.gif", "interpolate=[1,2]"], ["interpolate=[A,B]"],
                     id="gif-without-interpolate"),
    ],
)
def test_bad_value_is_one_error_line_and_the_right_one_works(ckpt, tmp_path, monkeypatch, capsys, bad, good,
                                                            fragments):
    monkeypatch.chdir(tmp_path)
    args = [f"checkpoint={ckpt}", "n=4", "steps=3", f"output={OUT}"]
    assert_one_error(*call(main, [*args, *bad], capsys), *fragments)
    assert list(tmp_path.iterdir()) == []  # refused before any work
    code, out, err = call(main, [*args, *good], capsys)
    assert code == 0, err
    assert len(list(tmp_path.iterdir())) == 1 and "Wrote" in out


def test_missing_checkpoint_key_is_one_error_line(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_one_error(*call(main, ["n=4"], capsys), "checkpoint", "write checkpoint=VALUE")
    assert list(tmp_path.iterdir()) == []
    assert call(main, [f"checkpoint={ckpt}", "n=4"], capsys)[0] == 0


def test_the_old_option_spelling_is_refused_in_one_line(ckpt, capsys):
    assert_one_error(*call(main, [f"checkpoint={ckpt}", "--output", "x.png"], capsys))


def test_the_checkpoint_alone_is_checkpoint_path(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert call(main, [str(ckpt), "n=5", "output=alone.npz"], capsys)[0] == 0
    assert call(main, [f"checkpoint={ckpt}", "n=5", "output=key.npz"], capsys)[0] == 0
    assert np.array_equal(np.load("alone.npz")["samples"], np.load("key.npz")["samples"])


@pytest.mark.parametrize("extra", [["foo.ckpt"], ["CKPT", "foo.ckpt"]], ids=["no-such-path", "second-path"])
def test_a_bad_bare_argument_is_one_error_line_with_the_checkpoint_command(ckpt, tmp_path, monkeypatch, capsys,
                                                                          extra):
    monkeypatch.chdir(tmp_path)
    args = [str(ckpt) if a == "CKPT" else a for a in extra]
    assert_one_error(*call(main, [*args, "n=4"], capsys),
                     "'foo.ckpt': expected key=value", "python -m wgan_lit.generate checkpoint=foo.ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_device_cuda_without_a_gpu_names_device_cpu(ckpt, tmp_path, capsys):
    assert_one_error(*call(main, [f"checkpoint={ckpt}", "device=cuda", f"output={tmp_path / 'x.png'}"], capsys),
                     "no CUDA device is visible", "device=cpu")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible")
def test_device_cuda_gives_the_cpu_samples(ckpt, tmp_path, capsys):
    for device in ("cpu", "cuda"):
        assert call(main, [f"checkpoint={ckpt}", "n=16", f"device={device}", f"output={tmp_path / device}.npz"],
                    capsys)[0] == 0
    cpu, cuda = (np.load(tmp_path / f"{d}.npz")["samples"] for d in ("cpu", "cuda"))
    assert np.allclose(cpu, cuda, atol=1e-3)  # the same codes: drawn on the CPU whatever the device


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint", "half", "folder"])
def test_bad_checkpoint_is_one_message_naming_the_file(ckpt, tmp_path, capsys, content):
    bad = tmp_path / "bad.ckpt"
    if content == "half":
        bad.write_bytes(ckpt.read_bytes()[:5000])
    elif content == "folder":
        bad.mkdir()
    elif content is not None:
        bad.write_bytes(content)
    assert_one_error(*call(main, [f"checkpoint={bad}", f"output={tmp_path / 'x.png'}"], capsys),
                     f"Error: checkpoint {bad}:")
    assert not (tmp_path / "x.png").exists()


def test_a_checkpoint_of_another_wgan_version_is_one_message(ckpt, tmp_path, capsys):
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    blob["hyper_parameters"]["setting_of_a_later_version"] = 1
    other = tmp_path / "other.ckpt"
    torch.save(blob, other)
    assert_one_error(*call(main, [f"checkpoint={other}", f"output={tmp_path / 'x.png'}"], capsys),
                     f"checkpoint {other}: does not fit")


def test_a_checkpoint_written_with_runtime_switches_among_its_hyperparameters_still_loads(ckpt, tmp_path, capsys):
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    # as checkpoints were before RuntimeConfig: the switches saved as hyperparameters, no wgan_runtime entry
    blob["hyper_parameters"].update(channels_last=False, compile=True, fused_clamp=False)
    del blob["wgan_runtime"]
    old = tmp_path / "old.ckpt"
    torch.save(blob, old)
    assert call(main, [f"checkpoint={old}", "n=4", f"output={tmp_path / 'old.pt'}"], capsys)[0] == 0
    assert call(main, [f"checkpoint={ckpt}", "n=4", f"output={tmp_path / 'new.pt'}"], capsys)[0] == 0
    assert torch.equal(torch.load(tmp_path / "old.pt"), torch.load(tmp_path / "new.pt"))
    model = gen.load_generator(old, "cpu")
    assert not model.runtime.compile and "compile" not in model.hparams  # dropped: this machine's defaults


@pytest.mark.slow
def test_the_module_entry_point(ckpt, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return run_cli(["-m", "wgan_lit.generate", *args], cwd=tmp_path, check=False)

    bad = run(f"checkpoint={ckpt}", "n=many")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("Error: ") and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "Traceback" not in bad.stderr and "HYDRA_FULL_ERROR" not in bad.stderr and "n=many" in bad.stderr
    good = run(f"checkpoint={ckpt}", "n=5", "output=s.pt", "device=cpu")
    assert good.returncode == 0, good.stderr[-3000:]
    samples = torch.load(tmp_path / "s.pt", weights_only=True)
    assert samples.shape == (5, 1, 28, 28) and -1 <= samples.min() and samples.max() <= 1
    assert math.isfinite(samples.sum().item())
