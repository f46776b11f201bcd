"""The decoded-image cache: image files decoded once into one uint8 ``.npy`` file, memory-mapped after.

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
from tqdm.auto import tqdm

from wgan_lit.checkpointing import atomic_write
from wgan_lit.config import DataError
from wgan_lit.image_files import SkippedFilesWarning, decode_image

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1  # bump when the decoding changes, so old caches are not reused
PARALLEL_MIN_FILES = 512  # below this a process pool costs more than it saves
_NPY_HEADER_BYTES = 128  # fixed, so the header can be written last, when the count of good images is known


def _decode_or_reason(path: Path, image_size: int, center_crop: int) -> np.ndarray | str:
    try:
        return decode_image(path, image_size, center_crop)
    except Exception as err:  # noqa: BLE001 - whatever a decoder raises on one file, that file is unreadable
        return f"{type(err).__name__}: {err}"


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
    skipped: list[tuple[str, str]] = []
    n = 0
    try:
        # Written in order (not through a memmap), so a full disk raises OSError instead of killing us with SIGBUS.
        with atomic_write(path) as tmp:  # the .npy's name appears only after its manifest's
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
            manifest = {"source": str(source.resolve()), "images": n, "files": len(files), **asdict(spec),
                        "skipped": [{"file": name, "error": why} for name, why in skipped]}
            with atomic_write(path.with_suffix(".json")) as tmp_json:
                tmp_json.write_text(json.dumps(manifest, indent=1))
    except OSError as err:
        raise DataError(f"Writing the decoded-image cache {path} failed ({err}); free some space there or set "
                        "data.cache_dir=ANOTHER_FOLDER.") from err
    if skipped:
        warnings.warn(_skipped_message(skipped, len(files), source), SkippedFilesWarning, stacklevel=2)
    return manifest


def _skipped_message(skipped: list[tuple[str, str]], total: int, source: Path) -> str:
    examples = "; ".join(f"{name} ({why})" for name, why in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (f"Skipped {len(skipped)} of {total} image files under {source} that could not be decoded: "
            f"{examples}{more}. Training uses the other {total - len(skipped)}.")


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
        for old in cache_dir.glob(f"{path.stem}.*.tmp-*"):
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
