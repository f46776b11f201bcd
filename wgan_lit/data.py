"""The datasets, each defined once by its data module class: Fashion-MNIST (``wgan_lit.fashion_mnist``), CelebA and
image folders (decoded once into a memory-mapped cache, ``wgan_lit.images``). Each is one uint8 tensor batched by
one index op and turned to [-1, 1] on the device; the loader's position is saved in every checkpoint."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from wgan_lit.config import DataConfig, DataError
from wgan_lit.fashion_mnist import load_fashion_mnist, locate_fashion_mnist
from wgan_lit.images import CacheSpec, celeba_files, ensure_cache, folder_files, open_cache

# torchdata 0.11 calls a deprecated torch API on every new iterator; nothing for a user to act on.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
MAX_REFERENCE = 10_000  # real images sample-quality metrics compare with (= the whole Fashion-MNIST test set)


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a whole uint8 N x C x H x W tensor once (antialiased), instead of per item every epoch."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def to_unit_range(batch: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], done on the device after the (4x smaller) uint8 transfer."""
    return batch.float().div_(127.5).sub_(1.0)


def pass_through(batch: torch.Tensor) -> torch.Tensor:
    """collate_fn for datasets whose ``__getitems__`` already returns the batch."""
    return batch


class InMemoryImages(Dataset):
    """Images held as one uint8 tensor; ``__getitems__`` makes a whole batch with a single index op. Read from a
    ``cache`` (file, image size), it pickles as that, so spawned dataloader workers map the file anew."""

    def __init__(self, images: torch.Tensor, cache: tuple[Path, int] | None = None) -> None:
        self.images, self.cache = images, cache

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, device=self.images.device)]

    def __getstate__(self) -> dict:
        return {"cache": self.cache} if self.cache else self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__init__(open_cache(*state["cache"]) if state.get("cache") else state["images"], state.get("cache"))


class ResumableLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader over a DistributedSampler, exact across epoch ends. What it adds, as measured
    with Lightning 2.6 and torchdata 0.11: the sampler's epoch (Lightning restores a resumed run's position before
    it calls ``set_epoch``, so it was taken in epoch 0's order); and a pass whose batches were all served is saved
    as the start of the next (restored as it is, a resume from an epoch's last batch skipped the next epoch).
    "All" is ``batches_per_pass()``, what the consumer takes: the loader cannot see trainer.limit_train_batches end
    Lightning's epoch early, and Lightning, resuming with the next epoch, restores the mid-pass position into it."""

    def __init__(self, *args: Any, batches_per_pass: Callable[[], float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches_per_pass = batches_per_pass

    def state_dict(self) -> dict[str, Any]:
        state, epoch = super().state_dict(), next((s.epoch for s in (self.sampler, getattr(
            self.batch_sampler, "sampler", None)) if isinstance(s, DistributedSampler)), None)
        served = min(len(self), self.batches_per_pass()) if self.batches_per_pass else len(self)
        if epoch is not None and state.get("_num_yielded", 0) >= served:
            return {"sampler_epoch": epoch + 1}  # no position: the next iterator starts a new pass
        return {**state, "sampler_epoch": epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if (epoch := state.pop("sampler_epoch", None)) is not None:
            _set_sampler_epoch(self, epoch)
        if state:
            super().load_state_dict(state)


class InMemoryDataModule(L.LightningDataModule):
    """Serves ``self.images`` (uint8 N x C x H x W, from a subclass's ``load_images()``) in shuffled full batches.
    A dataset is defined by its class: config, metrics and evaluate read these attributes."""

    name = ""  # its data.name, the key in DATAMODULES
    channels = 1
    splits: tuple[str, ...] = ("train",)  # the valid data.split values
    can_download = False  # data.download=true may fetch it
    reference_split = "train"  # the split evaluate's sample-quality metrics compare against
    has_classifier = False  # the Fashion-MNIST classifier metrics (fd_classifier, kid, coverage) apply

    images: torch.Tensor | None = None
    cache_file: Path | None = None  # the decoded-image cache the images are read from, if any

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def setup(self, stage: str | None = None) -> None:
        if self.images is None:
            self.images = self.load_images()
        if self.cfg.device_resident and self.trainer is not None and self.trainer.strategy.root_device.type != "cpu":
            # Each process (DDP rank) copies the uint8 images once to its device, where batches are then indexed.
            self.images = self.images.to(self.trainer.strategy.root_device)

    def train_dataloader(self) -> ResumableLoader:
        if self.images is None:
            self.setup("fit")
        if len(self.images) < self.cfg.batch_size:
            raise DataError(f"data.batch_size={self.cfg.batch_size} is larger than the dataset "
                            f"({len(self.images)} images); lower data.batch_size.")
        dataset = InMemoryImages(self.images, self.cache_file and (self.cache_file, self.cfg.image_size))
        # The order of pass k is randperm seeded by (seed, k). Under DDP rank r takes places r, r + world size, ...
        # of it, and drop_last leaves the remainder out (the sampler Lightning puts in otherwise pads the pass
        # with its first images, which then go to two ranks).
        replicas = (self.trainer and self.trainer.distributed_sampler_kwargs) or {"num_replicas": 1, "rank": 0}
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # set by seed_everything, read so by Lightning too
        return ResumableLoader(
            dataset, batch_size=self.cfg.batch_size,
            sampler=DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True, **replicas),
            generator=torch.Generator().manual_seed(0),  # worker seeds: not drawn from the noise's RNG
            drop_last=True,  # every critic step sees a full batch of m images, as in the paper
            collate_fn=pass_through, num_workers=self.cfg.num_workers, persistent_workers=self.cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available() and self.images.device.type == "cpu",
            # inf until Lightning's fit loop has measured the epoch; then the batches it takes, per rank
            batches_per_pass=lambda: self.trainer.num_training_batches if self.trainer else float("inf"),
        )

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        return to_unit_range(batch)

    def reference_images(self, split: str | None = None) -> torch.Tensor:
        """Up to MAX_REFERENCE real images (uint8 N x C x S x S) metrics compare with: those this module serves
        (``split`` is for datasets with a held-out split, see FashionMNISTDataModule)."""
        if self.images is None:
            self.setup("fit")
        return self.images[:MAX_REFERENCE]


class FashionMNISTDataModule(InMemoryDataModule):
    name, channels, splits, can_download, reference_split, has_classifier = (
        "fashion_mnist", 1, ("train", "test"), True, "test", True)

    def prepare_data(self) -> None:
        if self.images is None:  # read whole, so a corrupt file fails here, before anything is written
            self.images = self.load_images(download=self.cfg.download)

    def load_images(self, download: bool = False) -> torch.Tensor:
        images, _ = load_fashion_mnist(*locate_fashion_mnist(self.cfg.root, self.cfg.split, download))
        return resize_uint8(images, self.cfg.image_size)

    def reference_images(self, split: str | None = None) -> torch.Tensor:
        """The first MAX_REFERENCE images of ``split``: by default reference_split, the test set (what evaluate
        reports); training passes "train", so the test set stays unseen."""
        images, _ = load_fashion_mnist(*locate_fashion_mnist(self.cfg.root, split or self.reference_split,
                                                             self.cfg.download))
        return resize_uint8(images[:MAX_REFERENCE], self.cfg.image_size)


class CachedImageDataModule(InMemoryDataModule):
    """RGB images from files (a subclass's ``list_files()``: source folder, files), decoded once into a cache."""

    channels = 3
    one_split = False  # True: every split is the same files (one cache, named "all")

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.root) / ".wgan_cache"

    def prepare_cache(self) -> Path:
        """The finished cache file of this data, built first if needed."""
        if self.cache_file is None or not self.cache_file.is_file():
            source, files = self.list_files()
            split = "all" if self.one_split else self.cfg.split
            spec = CacheSpec(self.name, split, self.cfg.image_size, self.cfg.center_crop)
            self.cache_file = ensure_cache(files, source, spec, self.cache_dir)
        return self.cache_file

    def prepare_data(self) -> None:
        self.prepare_cache()  # Lightning calls this on local rank 0 only; the lock covers every other caller

    def load_images(self) -> torch.Tensor:
        return open_cache(self.prepare_cache(), self.cfg.image_size)


class CelebADataModule(CachedImageDataModule):
    """CelebA faces from ``<root>/celeba/img_align_celeba``; ``list_eval_partition.txt`` picks the split."""

    name, splits = "celeba", ("train", "valid", "test", "all")

    def list_files(self) -> tuple[Path, list[Path]]:
        return celeba_files(self.cfg.root, self.cfg.split)


class ImageFolderDataModule(CachedImageDataModule):
    """Every image under ``root``, recursively: LSUN exports, your own photos. No splits: all files."""

    name, splits, one_split = "folder", ("train", "all"), True

    def list_files(self) -> tuple[Path, list[Path]]:
        return folder_files(self.cfg.root)


# data.name -> its class; a new dataset is a class with the attributes above and one entry here.
DATAMODULES: dict[str, type[InMemoryDataModule]] = {
    c.name: c for c in (FashionMNISTDataModule, CelebADataModule, ImageFolderDataModule)}


def build_datamodule(cfg: DataConfig) -> InMemoryDataModule:
    return DATAMODULES[cfg.name](cfg)
