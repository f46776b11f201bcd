"""The decoded-image cache: what it holds, its key, rebuilding stale caches, atomic writes and the build lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wgan_lit.image_cache as cache_mod
from tests.conftest import REPO, cache_files, make_celeba, picture
from wgan_lit.config import DataError
from wgan_lit.image_cache import (
    CACHE_FORMAT_VERSION,
    CacheSpec,
    _decode_or_reason,
    build_cache,
    cache_key,
    cache_path,
    ensure_cache,
    open_cache,
)
from wgan_lit.image_files import SkippedFilesWarning, celeba_files, decode_image

# Tests that expect the skipped-file warning assert it with pytest.warns; elsewhere it is just noise.
pytestmark = pytest.mark.filterwarnings("ignore::wgan_lit.image_files.SkippedFilesWarning")


# ------------------------------------------------------------------------------------------------------------


def cached(root: Path, split: str = "train", image_size: int = 32, center_crop: int = 0,
           cache_dir: Path | None = None) -> tuple[Path, torch.Tensor]:
    """(cache file, its images) of CelebA under ``root``, built as CelebADataModule builds it."""
    source, files = celeba_files(root, split)
    spec = CacheSpec("celeba", split, image_size, center_crop)
    path = ensure_cache(files, source, spec, cache_dir or root / ".wgan_cache")
    return path, open_cache(path, image_size)


def decoded(root: Path, names: list[str], image_size: int = 32) -> torch.Tensor:
    folder = root / "celeba" / "img_align_celeba"
    return torch.from_numpy(np.stack([decode_image(folder / name, image_size) for name in names]))


TRAIN_GOOD = [f"{i:06d}.jpg" for i in range(30)] + ["000041.jpg", "000042.png", "000043.png"]  # not 000040


# ----------------------------------------------------------------------------------------------- contents


def test_the_cache_holds_every_decodable_file_in_order_and_names_the_skipped_one(celeba):
    with pytest.warns(SkippedFilesWarning, match=r"Skipped 1 of 34 image files.*000040\.jpg.*other 33") as rec:
        path, images = cached(celeba)
    assert len(rec) == 1
    assert images.shape == (33, 3, 32, 32) and images.dtype == torch.uint8  # 30 + gray, RGBA, palette
    assert torch.equal(images, decoded(celeba, TRAIN_GOOD))
    assert path.parent == celeba / ".wgan_cache" and np.load(path).shape == (33, 3, 32, 32)  # a plain .npy


@pytest.mark.parametrize("split,files", [("valid", range(30, 35)), ("test", range(35, 40))])
def test_the_cache_of_a_split_holds_its_files_in_the_partitions_order(celeba, split, files):
    _, images = cached(celeba, split)
    assert torch.equal(images, decoded(celeba, [f"{i:06d}.jpg" for i in files]))


def test_the_manifest_beside_the_cache_lists_the_settings_and_the_skipped_files(celeba):
    source, files = celeba_files(celeba)
    spec = CacheSpec("celeba", "train", 32, 0)
    path = celeba / "c" / "x.npy"
    path.parent.mkdir()
    returned = build_cache(files, path, spec, source, workers=1)
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest == returned
    assert (manifest["images"], manifest["files"], manifest["source"]) == (33, 34, str(source.resolve()))
    assert (manifest["dataset"], manifest["split"], manifest["image_size"], manifest["center_crop"]) == (
        "celeba", "train", 32, 0)
    assert manifest["format_version"] == CACHE_FORMAT_VERSION
    assert [s["file"] for s in manifest["skipped"]] == ["000040.jpg"] and manifest["skipped"][0]["error"]


def test_decode_or_reason_returns_the_pixels_or_why_not(celeba):
    folder = celeba / "celeba" / "img_align_celeba"
    good = _decode_or_reason(folder / "000000.jpg", 32, 0)
    assert isinstance(good, np.ndarray) and np.array_equal(good, decode_image(folder / "000000.jpg", 32))
    reason = _decode_or_reason(folder / "000040.jpg", 32, 0)
    assert isinstance(reason, str) and re.match(r"\w+Error: ", reason)


def test_all_corrupt_files_are_one_error_and_leave_no_cache(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jpg").write_bytes(b"nope")
    files = [tmp_path / "sub" / "x.jpg"]
    with pytest.raises(DataError, match=r"None of the 1 image files .*sub/x\.jpg"):
        ensure_cache(files, tmp_path, CacheSpec("folder", "all", 32, 0), tmp_path / ".wgan_cache")
    assert not list((tmp_path / ".wgan_cache").glob("*.npy*"))  # no cache, not even a partial
    assert not list((tmp_path / ".wgan_cache").glob("*.json*"))


def test_open_cache_is_copy_on_write(celeba):
    path, images = cached(celeba)
    before = images[0].clone()
    images[0] = 0  # a training step could not change the file
    assert torch.equal(open_cache(path, 32)[0], before)


# ----------------------------------------------------------------------------------------------- reuse and rebuilding


def test_second_run_reads_the_cache_without_decoding(celeba, monkeypatch):
    first_path, first = cached(celeba)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is complete")

    monkeypatch.setattr(cache_mod, "build_cache", no_decoding)
    monkeypatch.setattr(cache_mod, "decode_image", no_decoding)
    second_path, second = cached(celeba)
    assert torch.equal(first, second) and second_path == first_path


def test_cache_is_rebuilt_when_a_file_is_added_or_modified_and_the_stale_one_removed(celeba):
    cache = celeba / ".wgan_cache"
    first_path, first = cached(celeba)
    folder = celeba / "celeba" / "img_align_celeba"
    partition = celeba / "celeba" / "list_eval_partition.txt"

    Image.fromarray(picture(99)).save(folder / "000099.jpg")
    partition.write_text(partition.read_text() + "000099.jpg 0\n")
    added_path, added = cached(celeba)
    assert len(added) == len(first) + 1
    assert added_path != first_path and cache_files(cache) == [added_path.name]
    assert not first_path.with_suffix(".json").exists()  # its manifest goes with it

    Image.fromarray(picture(98)).save(folder / "000003.jpg")  # same name and size class, new pixels
    os.utime(folder / "000003.jpg", ns=(1, 1))
    modified_path, modified = cached(celeba)
    assert modified_path != added_path and cache_files(cache) == [modified_path.name]
    assert torch.equal(modified[3], torch.from_numpy(decode_image(folder / "000003.jpg", 32)))
    assert not torch.equal(modified[3], added[3])


@pytest.mark.parametrize("change", [{"image_size": 64}, {"center_crop": 30}, {"split": "valid"}])
def test_cache_is_rebuilt_when_a_setting_changes(celeba, change):
    base_path, base = cached(celeba)
    other_path, other = cached(celeba, **change)
    assert other_path != base_path
    assert base_path.is_file()  # a different setting is another cache, not a stale one
    assert other.shape != base.shape or not torch.equal(other, base)


def test_the_cache_of_another_folder_is_not_stale(tmp_path):
    a_path, _ = cached(make_celeba(tmp_path / "a"), cache_dir=tmp_path / "shared")
    b_path, _ = cached(make_celeba(tmp_path / "b"), cache_dir=tmp_path / "shared")
    assert a_path != b_path and a_path.is_file() and b_path.is_file()


def test_the_key_covers_every_setting_and_the_file_list(celeba):
    source = celeba / "celeba" / "img_align_celeba"
    files = sorted(source.glob("*"))
    base = CacheSpec("celeba", "train", 32, 0)
    variants = [CacheSpec("folder", "train", 32, 0), CacheSpec("celeba", "test", 32, 0),
                CacheSpec("celeba", "train", 64, 0), CacheSpec("celeba", "train", 32, 30),
                CacheSpec("celeba", "train", 32, 0, format_version=0)]
    keys = {cache_key(source, files, s) for s in [base, *variants]} | {cache_key(source, files[1:], base)}
    assert len(keys) == len(variants) + 2
    assert cache_key(source, files, base) == cache_key(source, list(files), CacheSpec("celeba", "train", 32, 0))


def test_the_file_name_says_what_the_cache_holds(celeba):
    source, files = celeba_files(celeba)
    auto = cache_path(celeba / "c", source, files, CacheSpec("celeba", "train", 32, 0))
    assert auto.parent == celeba / "c"
    assert re.fullmatch(r"celeba-train-32px-cropauto-[0-9a-f]{8}-[0-9a-f]{20}\.npy", auto.name), auto.name
    crop = cache_path(celeba / "c", source, files, CacheSpec("celeba", "train", 32, 30)).name
    assert crop.startswith("celeba-train-32px-crop30-")


# ----------------------------------------------------------------------------------------------- failures


def test_an_unwritable_cache_dir_is_one_clear_error(celeba, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"Cannot write the decoded-image cache in .*a_file.*data.cache_dir="):
        cached(celeba, cache_dir=tmp_path / "a_file")


def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_file(celeba, monkeypatch):
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "fsync", no_space)
    with pytest.raises(DataError, match="No space left on device.*data.cache_dir=ANOTHER_FOLDER"):
        cached(celeba)
    assert not list((celeba / ".wgan_cache").glob("*.npy*"))


def test_a_truncated_cache_file_is_an_error_that_says_delete_it(celeba):
    path, _ = cached(celeba)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="delete it and it will be rebuilt"):
        open_cache(path, 32)


def test_a_cache_of_another_size_is_an_error_that_says_delete_it(celeba):
    path, _ = cached(celeba)
    with pytest.raises(DataError, match=r"holds uint8 \(33, 3, 32, 32\), not uint8 N x 3 x 64 x 64; delete it"):
        open_cache(path, 64)


def test_leftovers_of_a_killed_build_are_removed_by_the_next_build(celeba):
    source, files = celeba_files(celeba)
    spec = CacheSpec("celeba", "train", 32, 0)
    path = cache_path(celeba / ".wgan_cache", source, files, spec)
    path.parent.mkdir()
    leftovers = [path.with_name(f"{path.name}.tmp-99999"), path.with_name(f"{path.stem}.json.tmp-99999")]
    for f in leftovers:
        f.write_bytes(b"half a cache")
    assert ensure_cache(files, source, spec, celeba / ".wgan_cache") == path
    assert not any(f.exists() for f in leftovers) and open_cache(path, 32).shape[0] == 33


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import wgan_lit.image_cache as m
from wgan_lit.image_files import celeba_files
real = m.decode_image
def slow(*a, **k):
    time.sleep(0.2)
    return real(*a, **k)
m.decode_image = slow
root = Path(sys.argv[1])
source, files = celeba_files(root, "train")
m.ensure_cache(files, source, m.CacheSpec("celeba", "train", 32, 0), root / ".wgan_cache")
"""


@pytest.mark.slow
def test_a_build_killed_half_way_is_never_used_and_is_cleaned_up(celeba):
    cache = celeba / ".wgan_cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(celeba)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):  # until the build has started writing
            if list(cache.glob("*.tmp-*")) or proc.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    partial = list(cache.glob("*.npy.tmp-*"))
    assert partial and not cache_files(cache)  # killed mid-write: a partial file, no finished cache

    with pytest.warns(SkippedFilesWarning):
        path, images = cached(celeba)
    assert images.shape == (33, 3, 32, 32) and path.name + ".tmp-" in partial[0].name
    assert not list(cache.glob("*.tmp-*"))  # the killed build's leftovers are removed


# ----------------------------------------------------------------------------------------------- parallel builds


def test_parallel_build_equals_serial_build(celeba, tmp_path, monkeypatch):
    source = celeba / "celeba" / "img_align_celeba"
    files = sorted(source.glob("*"))
    spec = CacheSpec("celeba", "all", 32, 0)
    with pytest.warns(SkippedFilesWarning):
        build_cache(files, tmp_path / "serial.npy", spec, source, workers=1)
    monkeypatch.setattr(cache_mod, "PARALLEL_MIN_FILES", 0)
    with pytest.warns(SkippedFilesWarning):
        build_cache(files, tmp_path / "parallel.npy", spec, source, workers=2)
    assert np.array_equal(np.load(tmp_path / "serial.npy"), np.load(tmp_path / "parallel.npy"))


def test_concurrent_processes_build_once(celeba, tmp_path, monkeypatch):
    """Like DDP ranks that all call prepare_data/setup: one process decodes, the others wait and reuse it."""
    source = celeba / "celeba" / "img_align_celeba"
    files = sorted(source.glob("*.jpg"))[:10]
    log = tmp_path / "decoded.log"
    real = cache_mod.decode_image

    def logged(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "decode_image", logged)
    spec = CacheSpec("celeba", "all", 32, 0)
    ctx = multiprocessing.get_context("fork")  # children inherit the patched decoder
    procs = [ctx.Process(target=ensure_cache, args=(files, source, spec, celeba / "c")) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    decoders = log.read_text().split()
    assert len(decoders) == len(files) and len(set(decoders)) == 1  # one process decoded each file once
    assert len(cache_files(celeba / "c")) == 1
