"""Fashion-MNIST's IDX files, found (data.root, Debian's copy, a download) and read with checks naming a bad file."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from wgan_lit.config import DataError

SYSTEM_DIRS: list[Path] = [Path("/usr/share/datasets/fashion-mnist")]  # apt-get install dataset-fashion-mnist
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or raw) with ``ndim`` dimensions, checking its header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be decompressed ({err}); the file is corrupt or truncated. "
                        "Delete it and fetch it again.") from err
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header; the file is truncated.")
    what = {3: "images", 1: "labels"}[ndim]
    if raw[:4] != bytes([0, 0, 8, ndim]):
        raise DataError(f"{path}: wrong magic number {raw[:4].hex()} (expected 000008{ndim:02x}: unsigned-byte IDX "
                        f"{what} with {ndim} dimension(s)); this is not a Fashion-MNIST {what} file.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - 4 - 4 * ndim != (expected := int(np.prod(shape))):
        raise DataError(f"{path}: header says shape {shape} = {expected} bytes of data but the file holds "
                        f"{len(raw) - 4 - 4 * ndim}; the file is truncated or corrupt. Delete it and fetch it again.")
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def locate_fashion_mnist(root: str | Path, split: str = "train", download: bool = False) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``split`` ("train" or "test"), downloading them if allowed."""
    names = [f"{SPLIT_PREFIX[split]}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    dirs = [Path(root), Path(root) / "FashionMNIST" / "raw", *SYSTEM_DIRS]  # in this order; then the download
    find = lambda: [next((p for d in dirs for p in (d / n, d / f"{n}.gz") if p.is_file()), None) for n in names]
    found, download_error = find(), ""
    if None in found and download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=split == "train", download=True)
            found = find()
        except Exception as err:  # network errors come in many types; report whichever it was
            download_error = f"\nThe download failed: {type(err).__name__}: {err}"
    if None in found:
        ways = [*([] if download else  # with download=true it was tried: the reason above is what to fix
                  ["add data.download=true (torchvision fetches it into <data.root>/FashionMNIST/raw)"]),
                "sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu, into /usr/share/datasets/fashion-mnist)",
                "put the four IDX files from github.com/zalandoresearch/fashion-mnist in a folder and pass "
                "data.root=FOLDER"]
        raise DataError(f"Fashion-MNIST not found: no {names[found.index(None)]}[.gz] in any of\n  "
                        + "\n  ".join(map(str, dirs)) + f"{download_error}\nGet it one of these ways:\n  "
                        + "\n  ".join(f"{i}. {way}" for i, way in enumerate(ways, 1)))
    return found[0], found[1]


def load_fashion_mnist(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 1 x 28 x 28, labels int64 N) from checked IDX files."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                        f"{labels.shape[0]} labels; one of them is from another release or truncated.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
