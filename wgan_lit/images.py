"""Image files: CelebA in its own layout, folders, decoding a file, and the decoded-image cache: one uint8 N x 3 x S x S
``.npy`` per file list and settings in ``<root>/.wgan_cache``, built once under a lock, memory-mapped after."""

import hashlib
import json
import logging
import os
import warnings
from collections import namedtuple
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout
from PIL import Image, ImageOps
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from wgan_lit.checkpointing import atomic_write, remove_stale_temporaries
from wgan_lit.config import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
PARALLEL_MIN_FILES = 512  # below this a process pool costs more than it saves
CELEBA_HELP = """Expected CelebA in torchvision's layout:
  {root}/celeba/img_align_celeba/000001.jpg ... 202599.jpg   (the aligned and cropped faces, 178x218 JPEGs)
  {root}/celeba/list_eval_partition.txt   (optional: picks data.split=train|valid|test; else every image is used)
CelebA is not downloaded automatically (its Google Drive links are rate-limited): get img_align_celeba.zip and
list_eval_partition.txt from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html (Google Drive: Img/ and Eval/) or
Kaggle (datasets/jessicali9530/celeba-dataset), unzip them into {root}/celeba/ and pass data.root=THAT_FOLDER."""
# What decides a cache's pixels (its hash names the file); bump format_version when the decoding changes.
CacheSpec = namedtuple("CacheSpec", "dataset split image_size center_crop format_version", defaults=[1])


class SkippedFilesWarning(UserWarning):
    """Some image files could not be read and were left out of the dataset."""


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted; hidden ones skipped (the cache is ``.wgan_cache``)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def celeba_files(root: str | Path, split: str = "train") -> tuple[Path, list[Path]]:
    """(folder, files of ``split`` in list_eval_partition's order) of CelebA under ``root``, or a DataError."""
    root = Path(root)  # split: one of CelebADataModule.splits, as config.validate checks
    base = next((b for b in (root / "celeba", root) if (b / "img_align_celeba").is_dir()), None)
    if base is None:
        found = "does not exist" if not root.exists() else "has no celeba/img_align_celeba folder"
        raise DataError(f"CelebA not found: data.root={root} {found}.\n" + CELEBA_HELP.format(root=root))
    image_dir = base / "img_align_celeba"
    if (image_dir / "img_align_celeba").is_dir() and not any(image_dir.glob("*.jpg")):
        image_dir = image_dir / "img_align_celeba"  # Kaggle's zip nests the folder once more
    partition = next(filter(Path.is_file, (base / "list_eval_partition.txt", base / "list_eval_partition.csv")), None)
    if partition is None or split == "all":
        files = find_images(image_dir)
        if partition is None:
            log.info("No list_eval_partition.txt in %s: data.split=%s uses every image in %s", base, split, image_dir)
    else:
        code, listed = str(("train", "valid", "test").index(split)), []  # list_eval_partition.txt's 0, 1, 2
        for number, line in enumerate(partition.read_text().splitlines(), start=1):
            parts = line.replace(",", " ").split()
            if not parts or (number == 1 and partition.suffix == ".csv" and not parts[-1].isdigit()):
                continue  # a blank line, or Kaggle's header image_id,partition
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DataError(f"{partition}, line {number}: {line!r} is not '<file name> <0|1|2>'; the partition "
                                "file is damaged. Fetch it again or delete it to use the whole folder.")
            if parts[1] == code:
                listed.append(image_dir / parts[0])
        files = [f for f in listed if f.is_file()]
        if missing := [f.name for f in listed if not f.is_file()]:
            warnings.warn(f"{len(missing)} of the {len(listed)} images that {partition.name} puts in split {split!r} "
                          f"are missing from {image_dir} (e.g. {', '.join(missing[:5])}); using the {len(files)} "
                          "present. Unzip img_align_celeba.zip completely to use them all.", SkippedFilesWarning, 2)
    if not files:
        raise DataError(f"CelebA: no images for data.split={split} in {image_dir}.\n" + CELEBA_HELP.format(root=root))
    return image_dir, files


def folder_files(root: str | Path) -> tuple[Path, list[Path]]:
    """(folder, every image file under it); DataError if the folder is missing or holds no images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root={root}: no such folder. data=folder reads every .jpg/.jpeg/.png/.webp/"
                        ".bmp file under data.root (recursively); pass data.root=PATH_TO_YOUR_IMAGES.")
    if not (files := find_images(root)):
        raise DataError(f"data.root={root}: the folder holds no image files (looked recursively for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}); point data.root at a folder of images.")
    return root, files


def decode_image(path: str | Path, image_size: int, center_crop: int = 0) -> np.ndarray:
    """One file -> uint8 3 x S x S: upright, RGB, its centred ``center_crop`` square (0: the largest), resized."""
    with Image.open(path) as image:
        rgb = ImageOps.exif_transpose(image)  # photos from cameras and phones stand upright
        if rgb.mode != "RGB" and ("A" in rgb.getbands() or "transparency" in rgb.info):  # RGBA, LA, palette
            rgb = Image.alpha_composite(Image.new("RGBA", rgb.size, (255, 255, 255, 255)), rgb.convert("RGBA"))
        rgb = rgb.convert("RGB")
        crop = min(center_crop, min(rgb.size)) if center_crop > 0 else min(rgb.size)
        rgb = TF.resize(TF.center_crop(rgb, [crop, crop]), [image_size] * 2)  # bilinear, antialiased: the defaults
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def cache_path(cache_dir: Path, source: Path, files: list[Path], spec: CacheSpec) -> Path:
    """``<dataset>-<split>-<S>px-crop<C|auto>-<source hash>-<key>.npy``; key: the spec, each path, size, mtime."""
    h = hashlib.sha256(json.dumps(spec._asdict(), sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(source).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    where = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:8]
    crop = spec.center_crop or "auto"
    return cache_dir / f"{spec.dataset}-{spec.split}-{spec.image_size}px-crop{crop}-{where}-{h.hexdigest()[:20]}.npy"


def _decode_or_reason(path: Path, image_size: int, center_crop: int) -> np.ndarray | str:
    try:
        return decode_image(path, image_size, center_crop)
    except Exception as err:  # noqa: BLE001 - whatever a decoder raises on one file, that file is unreadable
        return f"{type(err).__name__}: {err}"


def build_cache(files: list[Path], path: Path, spec: CacheSpec, source: Path, workers: int = 0) -> None:
    """Decode ``files`` into the .npy ``path`` and its .json manifest; ``workers`` = processes (0: one per core)."""
    workers = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    s, skipped = spec.image_size, []
    work = partial(_decode_or_reason, image_size=s, center_crop=spec.center_crop)
    header = {"descr": "|u1", "fortran_order": False, "shape": (0, 3, s, s)}  # numpy pads it to one length for any N
    # Written in order (not through a memmap), so a full disk raises OSError instead of killing us with SIGBUS.
    with atomic_write(path) as tmp:  # the .npy's name appears only after its manifest's
        with open(tmp, "wb") as f, ExitStack() as stack:
            np.lib.format.write_array_header_1_0(f, header)  # rewritten once the count of good images is known
            pool = ProcessPoolExecutor(workers) if workers > 1 and len(files) >= PARALLEL_MIN_FILES else None
            stack.callback(lambda: pool and pool.shutdown(cancel_futures=True))  # on Ctrl-C stop now, not later
            results = (pool.map(work, files, chunksize=max(1, min(256, len(files) // (8 * workers)))) if pool
                       else map(work, files))
            for file, result in zip(files, tqdm(results, total=len(files), desc=f"Caching {spec.dataset} at "
                                                f"{s}px", unit="img", mininterval=1.0), strict=True):
                if isinstance(result, str):
                    skipped.append({"file": file.relative_to(source).as_posix(), "error": result})
                else:
                    f.write(result.data)
            if (n := len(files) - len(skipped)) == 0:
                raise DataError("None of the {} image files under {} could be decoded (e.g. {file}: {error}); they "
                                "are not images or are all corrupt.".format(len(files), source, **skipped[0]))
            f.seek(0)
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (n, 3, s, s)})
        with atomic_write(path.with_suffix(".json")) as tmp_json:  # the record of what it holds
            tmp_json.write_text(json.dumps({"source": str(source.resolve()), "images": n, "files": len(files),
                                            **spec._asdict(), "skipped": skipped}, indent=1))
    if skipped:
        examples = "; ".join(f"{x['file']} ({x['error']})" for x in skipped[:3]) + (
            f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warnings.warn(f"Skipped {len(skipped)} of {len(files)} image files under {source} that could not be decoded: "
                      f"{examples}. Training uses the other {n}.", SkippedFilesWarning, stacklevel=2)


def ensure_cache(files: list[Path], source: Path, spec: CacheSpec, cache_dir: Path, workers: int = 0) -> Path:
    """The finished cache of these files and settings, built first (under a lock: others wait) if there is none."""
    path = cache_path(cache_dir, source, files, spec)
    if path.is_file():  # no lock needed to read a finished cache (the folder may be read-only)
        log.info("Using the decoded-image cache %s", path)
        return path
    lock = FileLock(str(path.with_suffix(".lock")))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        try:
            held = lock.acquire(timeout=0)
        except Timeout:
            log.info("Another process is building %s; waiting for it", path)
            held = lock.acquire()
        with held:
            if not path.is_file():  # else the process we waited for built it
                remove_stale_temporaries(cache_dir)  # a killed build's, whose writer is gone
                log.info("Decoding %d images from %s into %s (once; later runs read it)", len(files), source, path)
                build_cache(files, path, spec, source, workers)
                for old in cache_dir.glob(f"{path.stem.rsplit('-', 1)[0]}-*"):
                    if old.stem != path.stem and old.suffix in (".npy", ".json"):
                        log.info("Removing %s: its source folder has changed since it was built", old)
                        old.unlink(missing_ok=True)
    except OSError as err:  # a folder we may not write, a full disk
        raise DataError(f"Cannot write the decoded-image cache in {cache_dir} ({err}); free some space there or set "
                        "data.cache_dir=ANOTHER_FOLDER.") from err
    return path


def open_cache(path: Path, image_size: int) -> torch.Tensor:
    """The cache as a uint8 N x 3 x S x S tensor over a copy-on-write memory map (nothing is copied)."""
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable cache file ({err}); delete it and it will be rebuilt.") from err
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (3, image_size, image_size):
        raise DataError(f"{path} holds {array.dtype} {array.shape}, not uint8 N x 3 x {image_size} x "
                        f"{image_size}; delete it and it will be rebuilt.")
    return torch.from_numpy(array)
