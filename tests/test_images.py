"""Image files (CelebA's layout and partitions, folders, decoding to RGB) and the decoded-image cache: its contents and
key, reuse and rebuilding, one-line errors, a killed build, the build lock."""

import json
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wgan_lit.images as im
from tests.conftest import cache_files, make_celeba, make_folder, picture
from wgan_lit.config import DataError
from wgan_lit.images import CacheSpec, SkippedFilesWarning, celeba_files, decode_image, open_cache

pytestmark = pytest.mark.filterwarnings("ignore::wgan_lit.images.SkippedFilesWarning")  # asserted where expected
# CelebA's train split (tests/conftest.py): 30 JPEGs, then a corrupt one, a gray one, an RGBA and a palette PNG
TRAIN = [f"{i:06d}.jpg" for i in range(30)] + ["000040.jpg", "000041.jpg", "000042.png", "000043.png"]


def cached(root: Path, split: str = "train", cache_dir: Path | None = None, **spec) -> tuple[Path, torch.Tensor]:
    """(cache file, its images) of CelebA under ``root``, built as CelebADataModule builds it."""
    source, files = celeba_files(root, split)
    spec = CacheSpec("celeba", split, **{"image_size": 32, "center_crop": 0, **spec})
    path = im.ensure_cache(files, source, spec, cache_dir or root / ".wgan_cache")
    return path, open_cache(path, spec.image_size)


def save(pixels: np.ndarray | Image.Image, path: Path, **kwargs) -> Path:
    (pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)).save(path, **kwargs)
    return path


def test_each_celeba_split_is_its_partition_files_in_the_partitions_order(celeba, tmp_path):
    folder, files = celeba_files(celeba, "train")
    assert folder == celeba / "celeba" / "img_align_celeba" and files == [folder / n for n in TRAIN]
    partition = celeba / "celeba" / "list_eval_partition.txt"
    partition.write_text("\n\n".join(reversed(partition.read_text().splitlines())) + "\n")  # blank lines too
    for split, ids in (("valid", range(30, 35)), ("test", range(35, 40))):
        assert [f.name for f in celeba_files(celeba, split)[1]] == [f"{i:06d}.jpg" for i in reversed(ids)]
    everything, no_partition = celeba_files(celeba, "all")[1], celeba_files(make_celeba(tmp_path / "b", False))[1]
    assert [f.name for f in everything] == [f.name for f in no_partition] == sorted(f.name for f in everything)
    assert len(everything) == 44
    assert celeba_files(celeba / "celeba", "valid")[0] == folder  # root = the celeba folder itself
    kaggle = tmp_path / "k" / "celeba" / "img_align_celeba" / "img_align_celeba"  # Kaggle's zip nests it once more
    kaggle.mkdir(parents=True)
    for i in range(6):
        save(picture(i), kaggle / f"{i:06d}.jpg")
    rows = "\n".join(f"{i:06d}.jpg,{0 if i < 4 else 2}" for i in range(6))
    for text in ("image_id,partition\n" + rows, rows):  # its .csv, with or without its header
        (tmp_path / "k" / "celeba" / "list_eval_partition.csv").write_text(text)
        assert celeba_files(tmp_path / "k", "test") == (kaggle, [kaggle / "000004.jpg", kaggle / "000005.jpg"])


def test_missing_celeba_files_or_a_damaged_partition_are_explained(celeba, tmp_path):
    with pytest.raises(DataError) as err:
        celeba_files(tmp_path / "nowhere")
    for text in ("CelebA not found", "does not exist", "celeba/img_align_celeba/000001.jpg", "list_eval_partition.txt",
                 "not downloaded automatically", "mmlab.ie.cuhk.edu.hk", "Kaggle", "data.root="):
        assert text in str(err.value)
    assert im.CELEBA_HELP.format(root=tmp_path / "nowhere") in str(err.value)
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="has no celeba/img_align_celeba folder"):
        celeba_files(tmp_path / "d")
    (tmp_path / "d" / "celeba" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(DataError, match="no images for data.split=train"):
        celeba_files(tmp_path / "d")
    (celeba / "celeba" / "img_align_celeba" / "000007.jpg").unlink()
    with pytest.warns(SkippedFilesWarning, match=r"1 of the 34 images .* missing .*000007\.jpg") as record:
        assert len(celeba_files(celeba)[1]) == 33
    assert len(record) == 1
    for line in ("000002.jpg 7", "000002.jpg", "000002.jpg 1 extra"):
        (celeba / "celeba" / "list_eval_partition.txt").write_text(f"000001.jpg 0\n{line}\n")
        with pytest.raises(DataError, match=r"list_eval_partition.txt, line 2: .*partition file is damaged"):
            celeba_files(celeba, "train")


def test_a_folder_lists_every_format_recursively_sorted_without_hidden_files_or_says_why_not(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / ".wgan_cache").mkdir()  # the cache lives here: never read back as images
    for hidden in (root / ".b.png", root / ".wgan_cache" / "c.png"):
        save(picture(0), hidden)
    assert im.folder_files(root) == (root, [root / "a.JPG", root / "sub" / "b.png", root / "sub" / "d.bmp",
                                            root / "sub" / "deeper" / "c.webp", root / "sub" / "e.jpeg"])
    assert {f.suffix.lower() for f in im.find_images(root)} == im.IMAGE_EXTENSIONS
    with pytest.raises(DataError, match="no such folder.*data.root=PATH"):
        im.folder_files(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="holds no image files"):
        im.folder_files(tmp_path / "empty")
    (tmp_path / "empty" / "sub" / "x.jpg").write_bytes(b"nope")
    assert im.folder_files(tmp_path / "empty")[1] == [tmp_path / "empty" / "sub" / "x.jpg"]  # decoding rejects it


def test_decoded_images_are_upright_rgb_squares_with_transparency_on_white_cropped_then_resized(celeba, tmp_path):
    folder = celeba / "celeba" / "img_align_celeba"
    out = decode_image(folder / "000000.jpg", 32)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8 and out.flags.c_contiguous and out.std() > 5
    assert (abs(decode_image(folder / "000041.jpg", 32).astype(int) - 100) <= 1).all()  # gray
    rgba = decode_image(folder / "000042.png", 32)
    assert (rgba[:, :, :12] == np.array([200, 0, 0])[:, None, None]).all() and (rgba[:, :, -12:] == 255).all()
    palette = np.array(Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0)))
    assert (decode_image(folder / "000043.png", 32) == palette[:, None, None]).all()
    with pytest.raises(Exception):  # noqa: B017 - PIL's error; the cache turns any into a skipped file
        decode_image(folder / "000040.jpg", 32)
    la, p = Image.new("LA", (20, 10), (50, 255)), Image.new("P", (20, 10), 0)
    la.paste((50, 0), (10, 0, 20, 10))  # right halves transparent: LA's alpha, a palette's transparent index
    p.putpalette([200, 0, 0, 0, 0, 200])
    p.paste(1, (10, 0, 20, 10))
    for path, left in ((save(la, tmp_path / "la.png"), [50, 50, 50]),
                       (save(p, tmp_path / "p.png", transparency=1), [200, 0, 0])):
        out = decode_image(path, 10)  # the centred 10 x 10: five opaque columns, five transparent
        assert (out[:, :, :5] == np.array(left)[:, None, None]).all() and (out[:, :, 5:] == 255).all()
    pixels, exif = picture(0, w=60, h=40), Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    rotated = save(pixels, tmp_path / "rotated.png", exif=exif)
    upright = save(np.rot90(pixels, k=-1).copy(), tmp_path / "upright.png")
    assert np.array_equal(decode_image(rotated, 40), decode_image(upright, 40))
    img = np.zeros((60, 40, 3), np.uint8)
    img[10:50] = 128  # the largest centred square is gray, the 10-row bands above and below black...
    img[20:40, 10:30] = 255  # ...and its centred 20 x 20 white
    auto = decode_image(save(img, tmp_path / "a.png"), 16)
    assert auto.min() > 100 and auto.max() == 255  # center_crop=0: the largest centred square, no black
    assert (decode_image(tmp_path / "a.png", 16, center_crop=20) == 255).all()
    assert np.array_equal(decode_image(tmp_path / "a.png", 16, center_crop=1000), auto)  # over the short side


def test_the_cache_holds_every_decodable_file_in_order_names_the_skipped_one_and_records_it(celeba, tmp_path):
    with pytest.warns(SkippedFilesWarning, match=r"Skipped 1 of 34 image files.*000040\.jpg \(\w+Error: .*"
                                                 r"other 33\.") as record:
        path, images = cached(celeba)
    folder = celeba / "celeba" / "img_align_celeba"
    good = [decode_image(folder / n, 32) for n in TRAIN if n != "000040.jpg"]
    assert len(record) == 1 and torch.equal(images, torch.from_numpy(np.stack(good)))
    assert np.load(path).shape == (33, 3, 32, 32)  # a plain .npy
    assert re.fullmatch(r"celeba-train-32px-cropauto-[0-9a-f]{8}-[0-9a-f]{20}\.npy", path.name), path.name
    manifest = json.loads(path.with_suffix(".json").read_text())
    skipped = manifest.pop("skipped")
    assert [s["file"] for s in skipped] == ["000040.jpg"] and re.match(r"\w+Error: ", skipped[0]["error"])
    assert manifest == {"source": str(folder.resolve()), "images": 33, "files": 34,
                        **CacheSpec("celeba", "train", 32, 0)._asdict()}
    before = images[0].clone()
    images[0] = 0  # copy-on-write: a training step cannot change the file
    assert torch.equal(open_cache(path, 32)[0], before)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"None of the 1 image files .*\(e.g. sub/x\.jpg: \w+Error"):
        im.ensure_cache([tmp_path / "sub" / "x.jpg"], tmp_path, CacheSpec("folder", "all", 32, 0), tmp_path / "c")
    assert not [p for p in (tmp_path / "c").iterdir() if p.suffix != ".lock"]  # no cache, not even a partial


def test_a_cache_is_reused_and_rebuilt_when_a_file_or_setting_changes_the_stale_one_removed(celeba, monkeypatch):
    cache, folder = celeba / ".wgan_cache", celeba / "celeba" / "img_align_celeba"
    first_path, first = cached(celeba)
    with monkeypatch.context() as m:
        m.setattr(im, "build_cache", None)  # calling either fails: a complete cache is read, not decoded
        m.setattr(im, "decode_image", None)
        assert cached(celeba)[0] == first_path and torch.equal(cached(celeba)[1], first)
    other_setting, _ = cached(celeba, image_size=16)  # another setting: another cache, never stale
    save(picture(99), folder / "000099.jpg")
    partition = celeba / "celeba" / "list_eval_partition.txt"
    partition.write_text(partition.read_text() + "000099.jpg 0\n")
    added_path, added = cached(celeba)
    assert len(added) == len(first) + 1 and cache_files(cache) == sorted([added_path.name, other_setting.name])
    assert not first_path.with_suffix(".json").exists()  # its manifest goes with it
    save(picture(98), folder / "000003.jpg")  # same name, new pixels
    os.utime(folder / "000003.jpg", ns=(1, 1))
    modified_path, modified = cached(celeba)
    assert cache_files(cache) == sorted([modified_path.name, other_setting.name])
    assert torch.equal(modified[3], torch.from_numpy(decode_image(folder / "000003.jpg", 32)))
    assert not torch.equal(modified[3], added[3])
    b_path, _ = cached(make_celeba(celeba / "b"), cache_dir=cache)  # another folder's cache is not stale either
    assert b_path.is_file() and modified_path.is_file()
    files, base = sorted(folder.glob("*")), CacheSpec("celeba", "train", 32, 0)  # the key: every setting, each file
    variants = [base._replace(**{k: v}) for k, v in (("dataset", "folder"), ("split", "test"), ("image_size", 64),
                                                     ("center_crop", 30), ("format_version", 0))]
    paths = {im.cache_path(cache, folder, files, s) for s in [base, *variants]}
    assert len(paths | {im.cache_path(cache, folder, files[1:], base)}) == len(variants) + 2
    assert im.cache_path(cache, folder, list(files), CacheSpec("celeba", "train", 32, 0)) in paths
    assert im.cache_path(cache, folder, files, variants[3]).name.startswith("celeba-train-32px-crop30-")


def test_an_unwritable_folder_a_full_disk_or_a_bad_cache_file_is_one_clear_error(celeba, tmp_path, monkeypatch):
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"^Cannot write the decoded-image cache in .*a_file.*data.cache_dir=[^\n]*$"):
        cached(celeba, cache_dir=tmp_path / "a_file")
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", no_space)
        with pytest.raises(DataError, match="No space left on device.*data.cache_dir=ANOTHER_FOLDER"):
            cached(celeba)
    assert not list((celeba / ".wgan_cache").glob("*.npy*"))  # no partial file
    path, _ = cached(celeba)
    with pytest.raises(DataError, match=r"holds uint8 \(33, 3, 32, 32\), not uint8 N x 3 x 64 x 64; delete it"):
        open_cache(path, 64)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="not a readable cache file.*delete it and it will be rebuilt"):
        open_cache(path, 32)


def test_a_build_killed_half_way_is_never_used_and_is_cleaned_up(celeba, monkeypatch):
    cache, real = celeba / ".wgan_cache", im.decode_image
    monkeypatch.setattr(im, "decode_image", lambda *args, **kwargs: (time.sleep(0.2), real(*args, **kwargs))[1])
    proc = multiprocessing.get_context("fork").Process(target=cached, args=(celeba,))  # a slow build, forked
    proc.start()
    monkeypatch.undo()
    while not list(cache.glob("*.tmp-*")) and proc.is_alive():  # until the build has started writing
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL, "the build finished before it could be killed"
    partial = list(cache.glob("*.npy.tmp-*"))
    assert partial and not cache_files(cache)  # killed mid-write: a partial file, no finished cache
    path, images = cached(celeba)
    assert images.shape == (33, 3, 32, 32) and partial[0].name.startswith(path.name + ".tmp-")
    assert not list(cache.glob("*.tmp-*"))  # the killed build's leftovers are removed


def test_a_parallel_build_equals_the_serial_one_and_concurrent_processes_build_once(celeba, tmp_path, monkeypatch):
    source = celeba / "celeba" / "img_align_celeba"
    files, spec = sorted(source.glob("*")), CacheSpec("celeba", "all", 32, 0)
    im.build_cache(files, tmp_path / "serial.npy", spec, source, workers=1)
    with monkeypatch.context() as m, pytest.warns(SkippedFilesWarning, match="Skipped 1 of 44"):
        m.setattr(im, "PARALLEL_MIN_FILES", 0)
        im.build_cache(files, tmp_path / "parallel.npy", spec, source, workers=2)
    assert np.array_equal(np.load(tmp_path / "serial.npy"), np.load(tmp_path / "parallel.npy"))
    log, real = tmp_path / "decoded.log", im.decode_image

    def logged(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(im, "decode_image", logged)  # like DDP ranks that all call prepare_data and setup
    ctx = multiprocessing.get_context("fork")  # children inherit the patched decoder
    procs = [ctx.Process(target=im.ensure_cache, args=(files[:10], source, spec, tmp_path / "c")) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0] and len(cache_files(tmp_path / "c")) == 1
    decoders = log.read_text().split()
    assert len(decoders) == 10 and len(set(decoders)) == 1  # one process decoded each file once, the others waited
