"""Fashion-MNIST's IDX files: found on disk (or downloaded through torchvision) and read with checks.

The files are read directly (gzipped or not) with checks that name the file when it is truncated or corrupt.
Looked for in ``data.root``, then in Debian's ``dataset-fashion-mnist`` copy, then downloaded through
torchvision when ``data.download=true``.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from wgan_lit.config import DataError

# Debian/Ubuntu: apt-get install dataset-fashion-mnist
SYSTEM_DIRS: list[Path] = [Path("/usr/share/datasets/fashion-mnist")]
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_MAGIC = {3: "images", 1: "labels"}  # number of dimensions -> what the file holds


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``.gz`` or raw) with ``ndim`` dimensions, checking its header."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        raise DataError(f"{path}: cannot be decompressed ({err}); the file is corrupt or truncated. "
                        "Delete it and fetch it again.") from err
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: only {len(raw)} bytes, too short for an IDX header; the file is truncated.")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(
            f"{path}: wrong magic number {raw[:4].hex()} (expected 000008{ndim:02x}: unsigned-byte IDX "
            f"{_IDX_MAGIC[ndim]} with {ndim} dimension(s)); this is not a Fashion-MNIST {_IDX_MAGIC[ndim]} file."
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset, expected = 4 + 4 * ndim, int(np.prod(shape))
    if len(raw) - offset != expected:
        raise DataError(
            f"{path}: header says shape {shape} = {expected} bytes of data but the file holds "
            f"{len(raw) - offset}; the file is truncated or corrupt. Delete it and fetch it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def _find(name: str, dirs: Sequence[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def search_dirs(root: str | Path) -> list[Path]:
    """Where the IDX files are looked for, in order: root, torchvision's layout under root, the system copy."""
    root = Path(root)
    return [root, root / "FashionMNIST" / "raw", *SYSTEM_DIRS]


def locate_fashion_mnist(root: str | Path, split: str = "train", download: bool = False) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``split``, downloading them if allowed and needed."""
    if split not in SPLIT_PREFIX:
        raise DataError(f"data.split={split!r}: expected one of {', '.join(SPLIT_PREFIX)}")
    prefix = SPLIT_PREFIX[split]
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    dirs = search_dirs(root)
    found = [_find(n, dirs) for n in names]
    download_error = ""
    if None in found and download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(root), train=split == "train", download=True)
            found = [_find(n, dirs) for n in names]
        except Exception as err:  # network errors come in many types; report whichever it was
            download_error = f"\nThe download failed: {type(err).__name__}: {err}"
    if None in found:
        missing = names[found.index(None)]
        tried = "\n".join(f"  {d}" for d in dirs)
        ways = [
            "sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu, into /usr/share/datasets/fashion-mnist)",
            "put the four IDX files from github.com/zalandoresearch/fashion-mnist in a folder and pass "
            "data.root=FOLDER",
        ]
        if not download:  # with download=true it was tried: the reason above is what to fix
            ways.insert(0, "add data.download=true (torchvision fetches it into <data.root>/FashionMNIST/raw)")
        listed = "\n".join(f"  {i}. {way}" for i, way in enumerate(ways, 1))
        raise DataError(
            f"Fashion-MNIST not found: no {missing}[.gz] in any of\n{tried}{download_error}\n"
            f"Get it one of these ways:\n{listed}"
        )
    return found[0], found[1]  # type: ignore[return-value]


def load_fashion_mnist(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 1 x 28 x 28, labels int64 N) from checked IDX files."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                        f"{labels.shape[0]} labels; one of them is from another release or truncated.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
