"""python -m wgan_lit.generate: grids, raw tensors streamed in batches, seeds, interpolations, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_fake_fashion_mnist
from tests.test_resume import tiny_config
from wgan_lit.generate import main, slerp
from wgan_lit.module import WGAN
from wgan_lit.train import train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gen")
    train(tiny_config(write_fake_fashion_mnist(tmp / "data", n_train=64), 2), tmp / "run")
    return tmp / "run" / "checkpoints" / "last.ckpt"


def test_png_grid(ckpt, tmp_path):
    out = tmp_path / "grid.png"
    assert main([str(ckpt), "-n", "9", "--output", str(out)]) == 0
    assert Image.open(out).size == (3 * 28 + 4 * 2, 3 * 28 + 4 * 2)  # 3 x 3 images of 28 px, padding 2


def test_raw_samples_are_n_c_h_w_in_range_streamed_in_batches_and_seeded(ckpt, tmp_path, monkeypatch):
    seen: list[int] = []
    real = WGAN.generate

    def spy(self, z):
        seen.append(len(z))
        return real(self, z)

    monkeypatch.setattr(WGAN, "generate", spy)
    npz, pt = tmp_path / "s.npz", tmp_path / "s.pt"
    assert main([str(ckpt), "-n", "37", "--batch-size", "8", "--seed", "5", "--output", str(npz)]) == 0
    assert seen == [8, 8, 8, 8, 5]  # never more than one batch in flight
    # key=value spelling, another batch size: the same codes, so the same images up to float rounding
    assert main([f"checkpoint={ckpt}", "n=37", "batch_size=37", "seed=5", f"output={pt}"]) == 0
    a, b = np.load(npz)["samples"], torch.load(pt, weights_only=True)
    assert a.shape == (37, 1, 28, 28) and a.dtype == np.float32 and b.shape == (37, 1, 28, 28)
    assert a.min() >= -1 and a.max() <= 1
    assert np.allclose(a, b.numpy(), atol=1e-5)
    again = tmp_path / "again.npz"
    main([str(ckpt), "-n", "37", "--batch-size", "8", "--seed", "5", "--output", str(again)])
    assert np.array_equal(np.load(again)["samples"], a)  # same seed, same batch size: identical
    other = tmp_path / "other.npz"
    main([str(ckpt), "-n", "37", "--batch-size", "8", "--seed", "6", "--output", str(other)])
    assert not np.allclose(np.load(other)["samples"], a)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".buffer-" in p.name] == []


def test_interpolation_as_gif_and_as_a_row(ckpt, tmp_path):
    gif, png = tmp_path / "walk.gif", tmp_path / "walk.png"
    assert main([str(ckpt), "--interpolate", "1", "2", "--steps", "6", "--output", str(gif)]) == 0
    assert Image.open(gif).n_frames == 6 + 4  # forward, then back without repeating the ends
    assert main([str(ckpt), "--interpolate", "1", "2", "--steps", "6", "--output", str(png)]) == 0
    assert Image.open(png).size == (6 * 28 + 7 * 2, 28 + 2 * 2)


def test_slerp_ends_at_both_codes():
    a, b = torch.randn(16), torch.randn(16)
    path = slerp(a, b, 5)
    assert path.shape == (5, 16)
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint", "half"])
def test_bad_checkpoint_is_one_message_naming_the_file(ckpt, tmp_path, capsys, content):
    bad = tmp_path / "bad.ckpt"
    if content == "half":
        bad.write_bytes(ckpt.read_bytes()[:5000])
    elif content is not None:
        bad.write_bytes(content)
    assert main([str(bad), "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"Error: checkpoint {bad}:") and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_wrong_output_suffix_is_refused(ckpt, tmp_path, capsys):
    assert main([str(ckpt), "--output", str(tmp_path / "x.jpg")]) == 2
    assert "x.jpg: expected a .png, .pt or .npz" in capsys.readouterr().err
