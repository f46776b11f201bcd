"""Shared fixtures: tiny IDX datasets written in Fashion-MNIST's format, and a tiny in-memory data module."""

from __future__ import annotations

import gzip
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from wgan_lit.data import InMemoryImages, pass_through, to_unit_range

REPO = Path(__file__).resolve().parent.parent


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion_mnist(root: Path, n_train: int = 256, n_test: int = 64, gz: bool = True) -> Path:
    """Fashion-MNIST-shaped IDX files with structured (not uniform) content, in ``root``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        yy, xx = np.mgrid[:28, :28]
        centres = rng.integers(6, 22, size=(n, 2))
        images = (255 * np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 40.0))
        labels = rng.integers(0, 10, size=n)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(arr.astype(np.uint8))
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    return write_fake_fashion_mnist(tmp_path / "fmnist")


class RandomImages(L.LightningDataModule):
    """Random uint8 images served the way the real data modules serve them."""

    channels = 1

    def __init__(self, n: int = 512, batch_size: int = 16, image_size: int = 28, channels: int = 1) -> None:
        super().__init__()
        self.channels = channels
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, channels, image_size, image_size), dtype=torch.uint8, generator=g)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(InMemoryImages(self.images), batch_size=self.batch_size, shuffle=True,
                          drop_last=True, collate_fn=pass_through)

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        return to_unit_range(batch)


def tiny_trainer(n_batches: int, callbacks: list | None = None, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=n_batches, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks or [], **kwargs,
    )


TINY = dict(g_features=8, d_features=8, latent_dim=16, n_fixed_samples=4)
