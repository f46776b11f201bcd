"""Fashion-MNIST as one in-memory uint8 tensor, served in batches by tensor indexing.

The IDX files are read directly (gzipped or not) with checks that name the file when it is truncated or
corrupt. Looked for in ``data.root``, then in Debian's ``dataset-fashion-mnist`` copy, then downloaded
through torchvision when ``data.download=true``.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from wgan_lit.resume import ResumableSampler

# Debian/Ubuntu: apt-get install dataset-fashion-mnist
SYSTEM_DIRS: list[Path] = [Path("/usr/share/datasets/fashion-mnist")]
SPLIT_PREFIX = {"train": "train", "test": "t10k"}
_IDX_MAGIC = {3: "images", 1: "labels"}  # number of dimensions -> what the file holds


class DataError(RuntimeError):
    """The data could not be found or read; the message says which file and how to fix it."""


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
            download_error = f"\nThe download (data.download=true) failed: {type(err).__name__}: {err}"
    if None in found:
        missing = names[found.index(None)]
        tried = "\n".join(f"  {d}" for d in dirs)
        raise DataError(
            f"Fashion-MNIST not found: no {missing}[.gz] in any of\n{tried}{download_error}\n"
            "Get it one of three ways:\n"
            "  1. add data.download=true (torchvision fetches it into <data.root>/FashionMNIST/raw)\n"
            "  2. sudo apt-get install dataset-fashion-mnist (Debian/Ubuntu, into /usr/share/datasets/fashion-mnist)\n"
            "  3. put the four IDX files from github.com/zalandoresearch/fashion-mnist in a folder and pass "
            "data.root=FOLDER"
        )
    return found[0], found[1]  # type: ignore[return-value]


def load_fashion_mnist(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N x 1 x 28 x 28, labels int64 N) from checked IDX files."""
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                        f"{labels.shape[0]} labels; one of them is from another release or truncated.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a whole uint8 N x C x H x W tensor once (antialiased), instead of per item every epoch."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def to_unit_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], done on the device after the (4x smaller) uint8 transfer."""
    return batch.float().div_(127.5).sub_(1.0)


class InMemoryImages(Dataset):
    """Images held as one uint8 tensor; ``__getitems__`` makes a whole batch with a single index op."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, device=self.images.device)]


def pass_through(batch: torch.Tensor) -> torch.Tensor:
    """collate_fn for datasets whose ``__getitems__`` already returns the batch."""
    return batch


class InMemoryDataModule(L.LightningDataModule):
    """Serves ``self.images`` (uint8 N x C x H x W, loaded by ``load_images``) in shuffled full batches.

    The order comes from a :class:`ResumableSampler` whose position is checkpointed (``state_dict``), so a
    resumed run continues the same pass over the data. Subclasses say where the images come from.
    """

    channels = 1

    def __init__(self, batch_size: int, image_size: int, num_workers: int = 0,
                 device_resident: bool = False) -> None:
        super().__init__()
        self.batch_size, self.image_size, self.num_workers = batch_size, image_size, num_workers
        self.device_resident = device_resident
        self.images: torch.Tensor | None = None
        self.sampler: ResumableSampler | None = None  # its state is checkpointed: see wgan_lit/resume.py
        self._sampler_state: dict | None = None

    def load_images(self) -> torch.Tensor:
        raise NotImplementedError

    def dataset(self) -> Dataset:
        return InMemoryImages(self.images)

    def setup(self, stage: str | None = None) -> None:
        if self.images is None:
            self.images = self.load_images()
        if self.device_resident and self.trainer is not None:
            # Each process (DDP rank) copies the uint8 images once to its own device; batches are then
            # indexed there, with no per-step host-to-device copy. A no-op on CPU.
            device = self.trainer.strategy.root_device
            if device.type != "cpu":
                self.images = self.images.to(device)

    def train_dataloader(self) -> DataLoader:
        if self.images is None:
            self.setup("fit")
        if len(self.images) < self.batch_size:
            raise DataError(f"data.batch_size={self.batch_size} is larger than the dataset "
                            f"({len(self.images)} images); lower data.batch_size.")
        self.sampler = ResumableSampler(len(self.images))
        if self._sampler_state is not None:  # from a checkpoint being resumed; used once
            self.sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        return DataLoader(
            self.dataset(),
            batch_size=self.batch_size,
            sampler=self.sampler,  # shuffles like shuffle=True, but a resumed run continues the same order
            generator=torch.Generator(),  # worker seeds drawn from here leave the global RNG to the noise
            drop_last=True,  # every critic step sees a full batch of m images, as in the paper
            collate_fn=pass_through,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available() and self.images.device.type == "cpu",
            persistent_workers=self.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        return to_unit_range(batch)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()} if self.sampler is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._sampler_state = state_dict.get("sampler")  # applied when the dataloader is built


class FashionMNISTDataModule(InMemoryDataModule):
    channels = 1

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 64,
        image_size: int = 28,
        num_workers: int = 0,
        download: bool = False,
        split: str = "train",
        device_resident: bool = False,
    ) -> None:
        super().__init__(batch_size, image_size, num_workers, device_resident)
        self.root, self.download, self.split = root, download, split

    def prepare_data(self) -> None:
        locate_fashion_mnist(self.root, self.split, self.download)

    def load_images(self) -> torch.Tensor:
        images, _ = load_fashion_mnist(*locate_fashion_mnist(self.root, self.split, download=False))
        return resize_uint8(images, self.image_size)
