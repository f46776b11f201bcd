"""CelebA and any folder of images, decoded once into a uint8 cache and served like the in-memory datasets.

Decoding and resizing 200k JPEGs every epoch would keep a GPU waiting, so on first use every image is decoded
(PIL), converted to RGB, centre-cropped and resized (torchvision) in parallel, and written into one
``.npy`` file of shape N x 3 x S x S. Later runs and epochs memory-map that file and make each batch with one
index op (:class:`~wgan_lit.data.InMemoryImages`).

The cache file's name holds a hash of the file list (relative paths, sizes, mtimes) and of every setting that
changes the pixels, so a changed folder or transform gets a new file and an old one is never reused. The file
is written under a temporary name, fsynced and renamed, so a build killed half-way is never taken for a
finished one. A file lock makes one process build while the others (DDP ranks, other runs) wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from wgan_lit.data import DataError, InMemoryDataModule, InMemoryImages

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
CELEBA_PARTITIONS = {"train": 0, "valid": 1, "test": 2}  # codes in list_eval_partition.txt; "all" = all
CACHE_FORMAT_VERSION = 1  # bump when the decoding below changes, so old caches are not reused
PARALLEL_MIN_FILES = 512  # below this a process pool costs more than it saves
_NPY_HEADER_BYTES = 128  # fixed, so the header can be written last, when the count of good images is known

CELEBA_HELP = """Expected CelebA in torchvision's layout:
  {root}/celeba/img_align_celeba/000001.jpg ... 202599.jpg   (the aligned and cropped faces, 178x218 JPEGs)
  {root}/celeba/list_eval_partition.txt                      (optional: picks data.split=train|valid|test;
                                                              without it every image in the folder is used)
CelebA is not downloaded automatically (its Google Drive links are rate-limited). Get img_align_celeba.zip and
list_eval_partition.txt by hand from the official page https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html
(Google Drive: Img/ and Eval/) or from Kaggle (datasets/jessicali9530/celeba-dataset), unzip them into
{root}/celeba/, and pass data.root=FOLDER_THAT_HOLDS_celeba."""


class SkippedFilesWarning(UserWarning):
    """Some image files could not be read and were left out of the dataset."""


# ------------------------------------------------------------------------------------------- finding files


def find_images(folder: Path) -> list[Path]:
    """Image files (jpg, jpeg, png, webp, bmp; any case) under ``folder``, recursively, sorted.

    Hidden files and folders are skipped: the cache lives in ``.wgan_cache`` beside the images.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(found)


def read_celeba_partition(path: Path) -> dict[str, int]:
    """file name -> 0/1/2 (train/valid/test) from list_eval_partition.txt (or Kaggle's .csv)."""
    out: dict[str, int] = {}
    lines = path.read_text().splitlines()
    if path.suffix == ".csv" and lines and not lines[0].split(",")[-1].strip().isdigit():
        lines = lines[1:]  # Kaggle's header: image_id,partition
    for number, line in enumerate(lines, start=1):
        parts = line.replace(",", " ").split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{path}, line {number}: {line!r} is not '<file name> <0|1|2>'; the partition "
                            "file is damaged. Fetch it again or delete it to use the whole folder.")
        out[parts[0]] = int(parts[1])
    return out


def celeba_files(root: str | Path, split: str = "train") -> tuple[Path, list[Path]]:
    """(folder, files of ``split``) of CelebA under ``root``; DataError explaining the layout if absent."""
    root = Path(root)
    if split not in (*CELEBA_PARTITIONS, "all"):
        raise DataError(f"data.split={split!r}: CelebA's splits are {', '.join([*CELEBA_PARTITIONS, 'all'])}")
    base = next((b for b in (root / "celeba", root) if (b / "img_align_celeba").is_dir()), None)
    if base is None:
        found = "does not exist" if not root.exists() else "has no celeba/img_align_celeba folder"
        raise DataError(f"CelebA not found: data.root={root} {found}.\n" + CELEBA_HELP.format(root=root))
    image_dir = base / "img_align_celeba"
    if (image_dir / "img_align_celeba").is_dir() and not any(image_dir.glob("*.jpg")):
        image_dir = image_dir / "img_align_celeba"  # Kaggle's zip nests the folder once more
    partition = next((p for p in (base / "list_eval_partition.txt", base / "list_eval_partition.csv")
                      if p.is_file()), None)
    if partition is None or split == "all":
        files = find_images(image_dir)
        if partition is None:
            log.info("No list_eval_partition.txt in %s: data.split=%s uses every image in %s",
                     base, split, image_dir)
    else:
        code = CELEBA_PARTITIONS[split]
        listed = [image_dir / name for name, c in read_celeba_partition(partition).items() if c == code]
        files = [f for f in listed if f.is_file()]
        if len(files) < len(listed):
            missing = [f.name for f in listed if not f.is_file()]
            warnings.warn(f"{len(missing)} of the {len(listed)} images that {partition.name} puts in split "
                          f"{split!r} are missing from {image_dir} (e.g. {', '.join(missing[:5])}); using "
                          f"the {len(files)} present. Unzip img_align_celeba.zip completely to use them all.",
                          SkippedFilesWarning, stacklevel=2)
    if not files:
        raise DataError(f"CelebA: no images for data.split={split} in {image_dir}.\n"
                        + CELEBA_HELP.format(root=root))
    return image_dir, files


def folder_files(root: str | Path) -> tuple[Path, list[Path]]:
    """(folder, every image file under it); DataError if the folder is missing or holds no images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root}: no such folder. data=folder reads every .jpg/.jpeg/.png/.webp/"
                        ".bmp file under data.root (recursively); pass data.root=PATH_TO_YOUR_IMAGES.")
    files = find_images(root)
    if not files:
        raise DataError(f"data.root={root}: the folder holds no image files (looked recursively for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point data.root at a folder of images.")
    return root, files


# ------------------------------------------------------------------------------------------- decoding


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB; transparent pixels (RGBA, LA, palette with transparency) become white, gray and palette expand."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(path: str | Path, image_size: int, center_crop: int = 0) -> np.ndarray:
    """One image file -> uint8 array 3 x S x S: RGB, centre-cropped to a square, resized (antialiased).

    ``center_crop`` = side of the centred square cut before resizing; 0 (or more than the short side) takes
    the largest one, which for CelebA's 178x218 faces equals torchvision's ``Resize(S) + CenterCrop(S)``.
    """
    with Image.open(path) as image:
        rgb = to_rgb(ImageOps.exif_transpose(image))  # photos from cameras and phones stand upright
        side = min(rgb.size)
        crop = min(center_crop, side) if center_crop > 0 else side
        rgb = TF.center_crop(rgb, [crop, crop])
        rgb = TF.resize(rgb, [image_size] * 2, interpolation=InterpolationMode.BILINEAR, antialias=True)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def _decode_or_reason(path: Path, image_size: int, center_crop: int) -> np.ndarray | str:
    try:
        return decode_image(path, image_size, center_crop)
    except Exception as err:  # noqa: BLE001 - whatever a decoder raises on one file, that file is unreadable
        return f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class CacheSpec:
    """Everything that decides a cache file's pixels; its hash (with the file list) names the file."""

    dataset: str
    split: str
    image_size: int
    center_crop: int
    format_version: int = CACHE_FORMAT_VERSION


def cache_key(source: Path, files: list[Path], spec: CacheSpec) -> str:
    """Hash of the spec and of every file's relative path, size and mtime: any change gives a new key."""
    h = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(source).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cache_path(cache_dir: Path, source: Path, files: list[Path], spec: CacheSpec) -> Path:
    """``<cache_dir>/<dataset>-<split>-<S>px-crop<C|auto>-<source hash>-<key>.npy``."""
    return cache_dir / f"{_cache_prefix(source, spec)}-{cache_key(source, files, spec)}.npy"


def _cache_prefix(source: Path, spec: CacheSpec) -> str:
    # Same prefix = same source folder and settings; only its contents can differ, so an older key is stale.
    where = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    crop = spec.center_crop or "auto"
    return f"{spec.dataset}-{spec.split}-{spec.image_size}px-crop{crop}-{where}"


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy v1.0 header for uint8 ``shape``, padded to exactly _NPY_HEADER_BYTES (np.load reads it)."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    text = text.ljust(_NPY_HEADER_BYTES - 10 - 1) + "\n"
    assert len(text) == _NPY_HEADER_BYTES - 10, shape
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def _decoded(files: list[Path], image_size: int, center_crop: int, workers: int
             ) -> Iterator[np.ndarray | str]:
    if workers <= 1 or len(files) < PARALLEL_MIN_FILES:
        for f in files:
            yield _decode_or_reason(f, image_size, center_crop)
        return
    work = partial(_decode_or_reason, image_size=image_size, center_crop=center_crop)
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        yield from pool.map(work, files, chunksize=max(1, min(256, len(files) // (8 * workers))))
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, stop now rather than after decoding every file


def build_cache(files: list[Path], path: Path, spec: CacheSpec, source: Path, workers: int = 0) -> dict:
    """Decode ``files`` into the .npy cache ``path`` (atomically); returns the manifest written beside it.

    Files that cannot be decoded are left out, with one SkippedFilesWarning. ``workers`` = processes
    (0: one per available core).
    """
    workers = workers or _cpu_count()
    s = spec.image_size
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    skipped: list[tuple[str, str]] = []
    n = 0
    try:
        # Written in order (not through a memmap), so a full disk raises OSError instead of killing us with SIGBUS.
        with open(tmp, "wb") as f:
            f.write(bytes(_NPY_HEADER_BYTES))  # the header goes here once the count of good images is known
            with closing(_decoded(files, s, spec.center_crop, workers)) as results:
                progress = tqdm(results, total=len(files), desc=f"Caching {spec.dataset} at {s}px", unit="img",
                                mininterval=1.0)
                for f_in, result in zip(files, progress, strict=True):
                    if isinstance(result, str):
                        skipped.append((f_in.relative_to(source).as_posix(), result))
                    else:
                        f.write(result.data)
                        n += 1
            if n == 0:
                raise DataError(f"None of the {len(files)} image files under {source} could be decoded (e.g. "
                                f"{skipped[0][0]}: {skipped[0][1]}); they are not images or are all corrupt.")
            f.seek(0)
            f.write(_npy_header((n, 3, s, s)))
            f.flush()
            os.fsync(f.fileno())
        manifest = {"source": str(source.resolve()), "images": n, "files": len(files), **asdict(spec),
                    "skipped": [{"file": name, "error": why} for name, why in skipped]}
        _write_atomically(path.with_suffix(".json"), json.dumps(manifest, indent=1).encode())
        os.replace(tmp, path)  # the finished name appears only now, complete
        _fsync_dir(path.parent)
    except OSError as err:
        raise DataError(f"Writing the decoded-image cache {path} failed ({err}); free some space there or set "
                        "data.cache_dir=ANOTHER_FOLDER.") from err
    finally:
        tmp.unlink(missing_ok=True)
    if skipped:
        warnings.warn(_skipped_message(skipped, len(files), source), SkippedFilesWarning, stacklevel=2)
    return manifest


def _skipped_message(skipped: list[tuple[str, str]], total: int, source: Path) -> str:
    examples = "; ".join(f"{name} ({why})" for name, why in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (f"Skipped {len(skipped)} of {total} image files under {source} that could not be decoded: "
            f"{examples}{more}. Training uses the other {total - len(skipped)}.")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (POSIX); not possible, nor needed, on Windows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))  # the cores this process may use (containers, taskset)
    return os.cpu_count() or 1


def ensure_cache(files: list[Path], source: Path, spec: CacheSpec, cache_dir: Path, workers: int = 0) -> Path:
    """Path of the finished cache for these files and settings, building it first if there is none.

    Safe to call from every process at once: one builds under a file lock, the others wait and then find it.
    """
    path = cache_path(cache_dir, source, files, spec)
    if path.is_file():  # no lock needed to read a finished cache (the folder may be read-only)
        log.info("Using the decoded-image cache %s", path)
        return path
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_suffix(".lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("Another process is building %s; waiting for it", path)
            lock.acquire()
    except OSError as err:
        raise DataError(f"Cannot write the decoded-image cache in {cache_dir} ({err}); set "
                        "data.cache_dir=A_WRITABLE_FOLDER.") from err
    try:
        if path.is_file():
            return path  # built by the process we waited for
        for old in cache_dir.glob(f"{path.stem}.*.partial-*"):
            old.unlink(missing_ok=True)  # left by a killed build of this key; we hold its lock: none runs
        log.info("Decoding %d images from %s into %s (once; later runs read the cache)",
                 len(files), source, path)
        build_cache(files, path, spec, source, workers)
        for old in cache_dir.glob(f"{_cache_prefix(source, spec)}-*"):
            if old.stem != path.stem and old.suffix in (".npy", ".json"):
                log.info("Removing %s: its source folder has changed since it was built", old)
                old.unlink(missing_ok=True)
    finally:
        lock.release()
    return path


def open_cache(path: Path, image_size: int) -> torch.Tensor:
    """The cache as a uint8 N x 3 x S x S tensor over a copy-on-write memory map (nothing is copied)."""
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable cache file ({err}); delete it and it will be rebuilt."
                        ) from err
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (3, image_size, image_size):
        raise DataError(f"{path} holds {array.dtype} {array.shape}, not uint8 N x 3 x {image_size} x "
                        f"{image_size}; delete it and it will be rebuilt.")
    return torch.from_numpy(array)


class CachedImages(InMemoryImages):
    """InMemoryImages over a cache file; pickles as its path, so spawned dataloader workers map it anew."""

    def __init__(self, path: Path, image_size: int, images: torch.Tensor | None = None) -> None:
        super().__init__(open_cache(path, image_size) if images is None else images)
        self.path, self.image_size = path, image_size

    def __getstate__(self) -> dict:
        return {"path": self.path, "image_size": self.image_size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["image_size"])


# ------------------------------------------------------------------------------------------- data modules


class CachedImageDataModule(InMemoryDataModule):
    """RGB images from files, decoded once into a cache; subclasses say which files."""

    channels = 3
    dataset_name = ""

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 64,
        image_size: int = 64,
        num_workers: int = 0,
        split: str = "train",
        center_crop: int = 0,
        cache_dir: str = "",
        device_resident: bool = False,
    ) -> None:
        super().__init__(batch_size, image_size, num_workers, device_resident)
        self.root, self.split, self.center_crop = root, split, center_crop
        self.cache_dir = Path(cache_dir) if cache_dir else Path(root) / ".wgan_cache"
        self.cache_file: Path | None = None

    def list_files(self) -> tuple[Path, list[Path]]:
        """(source folder, image files of the configured split)."""
        raise NotImplementedError

    def prepare_cache(self) -> Path:
        """The finished cache file of this data, built first if needed."""
        if self.cache_file is None or not self.cache_file.is_file():
            source, files = self.list_files()
            spec = CacheSpec(self.dataset_name, self.cache_split(), self.image_size, self.center_crop)
            self.cache_file = ensure_cache(files, source, spec, self.cache_dir)
        return self.cache_file

    def cache_split(self) -> str:
        return self.split

    def prepare_data(self) -> None:
        self.prepare_cache()  # Lightning calls this on local rank 0 only; the lock covers every other caller

    def load_images(self) -> torch.Tensor:
        return open_cache(self.prepare_cache(), self.image_size)

    def dataset(self) -> Dataset:
        return CachedImages(self.cache_file, self.image_size, self.images)  # workers reopen the memmap


class CelebADataModule(CachedImageDataModule):
    """CelebA faces from ``<root>/celeba/img_align_celeba``; ``list_eval_partition.txt`` picks the split."""

    dataset_name = "celeba"

    def list_files(self) -> tuple[Path, list[Path]]:
        return celeba_files(self.root, self.split)


class ImageFolderDataModule(CachedImageDataModule):
    """Every image under ``root``, recursively: LSUN exports, your own photos. No splits: all files."""

    dataset_name = "folder"

    def list_files(self) -> tuple[Path, list[Path]]:
        return folder_files(self.root)

    def cache_split(self) -> str:
        return "all"  # a folder has no splits: train and all are the same files, so one cache
