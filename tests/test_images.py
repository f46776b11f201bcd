"""CelebA and image folders: layout, splits, RGB conversion, skipping bad files, and the decoded cache."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image, ImageOps

import wgan_lit.images as images_mod
from wgan_lit.config import ConfigError, register_configs, validate
from wgan_lit.data import DataError
from wgan_lit.images import (
    CachedImages,
    CacheSpec,
    CelebADataModule,
    ImageFolderDataModule,
    SkippedFilesWarning,
    build_cache,
    cache_key,
    decode_image,
    ensure_cache,
    open_cache,
)

# Tests that expect the skipped-file warning assert it with pytest.warns; elsewhere it is just noise.
pytestmark = pytest.mark.filterwarnings("ignore::wgan_lit.images.SkippedFilesWarning")

# Not imported from tests.conftest: torch-fidelity installs a top-level "tests" package that shadows ours.
REPO = Path(__file__).resolve().parent.parent
N_JPEGS, W, H = 40, 40, 50  # CelebA's faces are 178 wide, 218 high: portrait, like these
SPLIT_OF = {**{i: 0 for i in range(30)}, **{i: 1 for i in range(30, 35)}, **{i: 2 for i in range(35, 40)}}


def picture(i: int, w: int = W, h: int = H) -> np.ndarray:
    """A smooth gradient in a colour of its own plus noise: realistic JPEGs, different from each other."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[:h, :w] / max(w, h)
    colour = rng.uniform(40, 215, size=3)
    img = colour + 40 * np.stack([yy, xx, yy * xx], -1) + rng.normal(0, 8, size=(h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def make_celeba(root: Path, partition: bool = True) -> Path:
    """40 JPEGs in CelebA's layout, a corrupt one, a gray one, an RGBA and a palette PNG (all 'train')."""
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for i in range(N_JPEGS):
        Image.fromarray(picture(i)).save(folder / f"{i:06d}.jpg", quality=90)
    (folder / "000040.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    Image.new("L", (W, H), 100).save(folder / "000041.jpg")
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:, W // 2:, 3] = 0  # right half fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "000042.png")
    Image.new("P", (W, H), 3).save(folder / "000043.png")  # palette index 3 of the default palette
    if partition:
        lines = [f"{i:06d}.jpg {SPLIT_OF[i]}" for i in range(N_JPEGS)]
        lines += ["000040.jpg 0", "000041.jpg 0", "000042.png 0", "000043.png 0"]
        (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def celeba(tmp_path) -> Path:
    return make_celeba(tmp_path / "data")


def module(root: Path, cls=CelebADataModule, **kwargs):
    kwargs = {"batch_size": 8, "image_size": 32, **kwargs}
    dm = cls(root=str(root), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.npy"))


# ----------------------------------------------------------------------------------------------- CelebA


def test_celeba_train_split_shapes_range_and_the_skipped_file(celeba):
    with pytest.warns(SkippedFilesWarning, match=r"Skipped 1 of 34 image files.*000040\.jpg.*other 33"):
        dm = module(celeba)
    assert dm.channels == 3
    assert dm.images.shape == (33, 3, 32, 32) and dm.images.dtype == torch.uint8  # 30 + gray, RGBA, palette
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(b.shape == (8, 3, 32, 32) and b.dtype == torch.uint8 for b in batches)
    x = dm.on_after_batch_transfer(batches[0], 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.max() - x.min() > 1


@pytest.mark.parametrize("split,files", [("valid", range(30, 35)), ("test", range(35, 40))])
def test_partition_file_picks_the_split_in_its_order(celeba, split, files):
    dm = module(celeba, split=split)
    folder = celeba / "celeba" / "img_align_celeba"
    expected = np.stack([decode_image(folder / f"{i:06d}.jpg", 32) for i in files])
    assert torch.equal(dm.images, torch.from_numpy(expected))


def test_split_all_and_a_missing_partition_file_use_the_whole_folder(tmp_path):
    with pytest.warns(SkippedFilesWarning, match="Skipped 1 of 44"):
        everything = module(make_celeba(tmp_path / "a"), split="all")
    with pytest.warns(SkippedFilesWarning, match="Skipped 1 of 44"):
        no_partition = module(make_celeba(tmp_path / "b", partition=False), split="train")
    assert len(everything.images) == len(no_partition.images) == 43
    assert torch.equal(everything.images, no_partition.images)


def test_files_listed_in_the_partition_but_absent_are_named_in_one_warning(celeba):
    (celeba / "celeba" / "img_align_celeba" / "000007.jpg").unlink()
    with pytest.warns(SkippedFilesWarning, match=r"1 of the 34 images .* missing .*000007\.jpg"):
        dm = module(celeba)
    assert len(dm.images) == 32


def test_exif_orientation_is_applied(tmp_path):
    img = Image.fromarray(picture(0, w=60, h=40))  # landscape pixels...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...stored rotated: viewers turn it 90 degrees
    img.save(tmp_path / "rotated.jpg", exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg")).convert("RGB"))
    assert upright.shape == (60, 40, 3)
    Image.fromarray(upright).save(tmp_path / "upright.png")  # lossless: the same pixels, no EXIF
    rotated, expected = decode_image(tmp_path / "rotated.jpg", 40), decode_image(tmp_path / "upright.png", 40)
    assert np.array_equal(rotated, expected)


def test_gray_palette_and_rgba_images_become_rgb(celeba):
    folder = celeba / "celeba" / "img_align_celeba"
    gray = decode_image(folder / "000041.jpg", 32)
    assert gray.shape == (3, 32, 32) and (abs(gray.astype(int) - 100) <= 1).all()
    rgba = decode_image(folder / "000042.png", 32)
    assert (rgba[:, :, :12] == np.array([200, 0, 0])[:, None, None]).all()  # opaque red half
    assert (rgba[:, :, -12:] == 255).all()  # transparent half on white, not black
    palette = decode_image(folder / "000043.png", 32)
    expected = Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0))
    assert (palette == np.array(expected)[:, None, None]).all()


def test_center_crop_then_resize(tmp_path):
    img = np.zeros((60, 40, 3), np.uint8)
    img[10:50] = 255  # the centred 40x40 square is white, the 10-row bands above and below are black
    Image.fromarray(img).save(tmp_path / "a.png")
    assert (decode_image(tmp_path / "a.png", 16) == 255).all()  # auto: the largest centred square
    cropped = decode_image(tmp_path / "a.png", 16, center_crop=20)
    assert (cropped == 255).all()
    Image.fromarray(img).resize((40, 60)).save(tmp_path / "b.png")
    assert decode_image(tmp_path / "b.png", 16, center_crop=1000).shape == (3, 16, 16)  # crop > the image


def test_missing_celeba_explains_the_layout_and_the_manual_download(tmp_path):
    with pytest.raises(DataError) as err:
        CelebADataModule(root=str(tmp_path / "nowhere")).prepare_data()
    message = str(err.value)
    for text in ("does not exist", "celeba/img_align_celeba/000001.jpg", "list_eval_partition.txt",
                 "not downloaded automatically", "mmlab.ie.cuhk.edu.hk", "Kaggle", "data.root="):
        assert text in message, message
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="has no celeba/img_align_celeba folder"):
        CelebADataModule(root=str(tmp_path / "data")).prepare_data()
    (tmp_path / "data" / "celeba" / "img_align_celeba").mkdir(parents=True)
    with pytest.raises(DataError, match="no images for data.split=train"):
        CelebADataModule(root=str(tmp_path / "data")).prepare_data()


def test_kaggle_layout_nested_folder_and_csv_partition(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(picture(i)).save(folder / f"{i:06d}.jpg")
    rows = [f"{i:06d}.jpg,{0 if i < 4 else 2}" for i in range(6)]
    (tmp_path / "celeba" / "list_eval_partition.csv").write_text("image_id,partition\n" + "\n".join(rows))
    assert len(module(tmp_path, batch_size=2, split="test").images) == 2


# ----------------------------------------------------------------------------------------------- folders


def test_folder_reads_every_format_recursively_at_64px(tmp_path):
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(picture(0)).save(root / "a.JPG")
    Image.fromarray(picture(1)).save(root / "sub" / "b.png")
    Image.fromarray(picture(2)).save(root / "sub" / "deeper" / "c.webp")
    Image.fromarray(picture(3)).save(root / "sub" / "d.bmp")
    (root / "notes.txt").write_text("not an image")
    dm = module(root, ImageFolderDataModule, batch_size=2, image_size=64)
    assert dm.images.shape == (4, 3, 64, 64)
    assert cache_files(root / ".wgan_cache")  # beside the data by default, and not read back as an image
    assert len(module(root, ImageFolderDataModule, batch_size=2, image_size=64).images) == 4


def test_folder_errors_missing_empty_and_all_corrupt(tmp_path):
    with pytest.raises(DataError, match="no such folder.*data.root=PATH"):
        ImageFolderDataModule(root=str(tmp_path / "nope")).prepare_data()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no image files"):
        ImageFolderDataModule(root=str(tmp_path / "empty")).prepare_data()
    (tmp_path / "empty" / "sub" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="None of the 1 image files"):
        ImageFolderDataModule(root=str(tmp_path / "empty")).prepare_data()
    assert not list((tmp_path / "empty" / ".wgan_cache").glob("*.npy*"))  # no cache, not even a partial


def test_batch_size_larger_than_the_dataset_is_an_error(celeba):
    dm = module(celeba, split="valid", batch_size=64)
    with pytest.raises(DataError, match="data.batch_size=64 is larger than the dataset \\(5 images\\)"):
        dm.train_dataloader()


# ----------------------------------------------------------------------------------------------- the cache


def test_second_run_reads_the_cache_without_decoding(celeba, monkeypatch):
    first = module(celeba)
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is complete")
    monkeypatch.setattr(images_mod, "build_cache", no_decoding)
    monkeypatch.setattr(images_mod, "decode_image", no_decoding)
    second = module(celeba)
    assert torch.equal(first.images, second.images) and second.cache_file == first.cache_file


def test_cache_is_rebuilt_when_a_file_is_added_or_modified_and_the_stale_one_removed(celeba):
    cache = celeba / ".wgan_cache"
    first = module(celeba)
    folder = celeba / "celeba" / "img_align_celeba"
    partition = celeba / "celeba" / "list_eval_partition.txt"

    Image.fromarray(picture(99)).save(folder / "000099.jpg")
    partition.write_text(partition.read_text() + "000099.jpg 0\n")
    added = module(celeba)
    assert len(added.images) == len(first.images) + 1
    assert added.cache_file != first.cache_file and cache_files(cache) == [added.cache_file.name]

    Image.fromarray(picture(98)).save(folder / "000003.jpg")  # same name and size class, new pixels
    os.utime(folder / "000003.jpg", ns=(1, 1))
    modified = module(celeba)
    assert modified.cache_file != added.cache_file
    assert torch.equal(modified.images[3], torch.from_numpy(decode_image(folder / "000003.jpg", 32)))
    assert not torch.equal(modified.images[3], added.images[3])


@pytest.mark.parametrize("change", [{"image_size": 64}, {"center_crop": 30}, {"split": "valid"}])
def test_cache_is_rebuilt_when_a_setting_changes(celeba, change):
    base = module(celeba)
    other = module(celeba, **change)
    assert other.cache_file != base.cache_file
    assert base.cache_file.is_file()  # a different setting is another cache, not a stale one
    assert other.images.shape != base.images.shape or not torch.equal(other.images, base.images)


def test_the_key_covers_every_setting_and_the_file_list(celeba):
    source = celeba / "celeba" / "img_align_celeba"
    files = sorted(source.glob("*"))
    base = CacheSpec("celeba", "train", 32, 0)
    variants = [CacheSpec("folder", "train", 32, 0), CacheSpec("celeba", "test", 32, 0),
                CacheSpec("celeba", "train", 64, 0), CacheSpec("celeba", "train", 32, 30),
                CacheSpec("celeba", "train", 32, 0, format_version=0)]
    keys = {cache_key(source, files, s) for s in [base, *variants]} | {cache_key(source, files[1:], base)}
    assert len(keys) == len(variants) + 2


def test_cache_dir_setting(celeba, tmp_path):
    dm = module(celeba, cache_dir=str(tmp_path / "elsewhere"))
    assert dm.cache_file.parent == tmp_path / "elsewhere" and not (celeba / ".wgan_cache").exists()
    manifest = dm.cache_file.with_suffix(".json").read_text()
    assert '"images": 33' in manifest and "000040.jpg" in manifest


def test_an_unwritable_cache_dir_is_one_clear_error(celeba, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DataError, match=r"Cannot write the decoded-image cache in .*a_file.*data.cache_dir="):
        CelebADataModule(root=str(celeba), cache_dir=str(tmp_path / "a_file")).prepare_data()


def test_a_full_disk_is_one_clear_error_and_leaves_no_partial_file(celeba, monkeypatch):
    def no_space(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(images_mod.os, "fsync", no_space)
    with pytest.raises(DataError, match="No space left on device.*data.cache_dir=ANOTHER_FOLDER"):
        CelebADataModule(root=str(celeba)).prepare_data()
    assert not list((celeba / ".wgan_cache").glob("*.npy*"))


KILL_SCRIPT = """
import sys, time
from pathlib import Path
import wgan_lit.images as m
real = m.decode_image
def slow(*a, **k):
    time.sleep(0.2)
    return real(*a, **k)
m.decode_image = slow
dm = m.CelebADataModule(root=sys.argv[1], image_size=32)
dm.prepare_data()
"""


@pytest.mark.slow
def test_a_build_killed_half_way_is_never_used_and_is_cleaned_up(celeba):
    cache = celeba / ".wgan_cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(celeba)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):  # until the build has started writing
            if list(cache.glob("*.partial-*")) or proc.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    partial = list(cache.glob("*.npy.partial-*"))
    assert partial and not cache_files(cache)  # killed mid-write: a partial file, no finished cache

    with pytest.warns(SkippedFilesWarning):
        dm = module(celeba)
    assert dm.images.shape == (33, 3, 32, 32) and dm.cache_file.name + ".partial-" in partial[0].name
    assert not list(cache.glob("*.partial-*"))  # the killed build's leftovers are removed


def test_a_truncated_cache_file_is_an_error_that_says_delete_it(celeba):
    dm = module(celeba)
    path = dm.cache_file
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="delete it and it will be rebuilt"):
        open_cache(path, 32)


def test_parallel_build_equals_serial_build(celeba, tmp_path, monkeypatch):
    source = celeba / "celeba" / "img_align_celeba"
    files = sorted(source.glob("*"))
    spec = CacheSpec("celeba", "all", 32, 0)
    with pytest.warns(SkippedFilesWarning):
        build_cache(files, tmp_path / "serial.npy", spec, source, workers=1)
    monkeypatch.setattr(images_mod, "PARALLEL_MIN_FILES", 0)
    with pytest.warns(SkippedFilesWarning):
        build_cache(files, tmp_path / "parallel.npy", spec, source, workers=2)
    assert np.array_equal(np.load(tmp_path / "serial.npy"), np.load(tmp_path / "parallel.npy"))


def test_concurrent_processes_build_once(celeba, tmp_path, monkeypatch):
    """Like DDP ranks that all call prepare_data/setup: one process decodes, the others wait and reuse it."""
    source = celeba / "celeba" / "img_align_celeba"
    files = sorted(source.glob("*.jpg"))[:10]
    log = tmp_path / "decoded.log"
    real = images_mod.decode_image
    def logged(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.02)
        return real(*args, **kwargs)
    monkeypatch.setattr(images_mod, "decode_image", logged)
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


def test_dataloader_workers_and_pickled_dataset(celeba):
    dm = module(celeba, num_workers=2)
    seen = torch.cat(list(dm.train_dataloader()))
    assert len(seen) == 32
    # every batch row is one of the cached images
    flat = dm.images.flatten(1)
    assert all((flat == row).all(1).any() for row in seen.flatten(1))
    dataset = pickle.loads(pickle.dumps(CachedImages(dm.cache_file, 32)))  # what a spawned worker gets
    assert torch.equal(dataset.images, dm.images)


# ----------------------------------------------------------------------------------------------- configs


def make_config(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_experiment_celeba_64_is_the_second_seed_and_the_paper_stays_the_default():
    cfg = validate(make_config(["experiment=celeba_64"]))
    m, d = cfg.model, cfg.data
    assert (d.name, d.image_size, d.batch_size) == ("celeba", 64, 64)
    assert (m.optimizer, m.lr_g, m.lr_d) == ("rmsprop", 5e-5, 5e-5)
    assert (m.latent_dim, m.clip_value, m.n_critic) == (128, 0.01, 5)
    assert (m.g_features, m.d_features) == (64, 64)
    assert cfg.trainer.max_epochs == 5 and cfg.max_gen_steps == -1
    assert cfg.logger.sample_every_n_gen_steps * m.n_critic == 100  # every 100 batches
    default = validate(make_config([]))
    assert default.data.name == "fashion_mnist" and default.model.latent_dim == 100
    assert validate(make_config(["data=celeba"])).data.image_size == 64


@pytest.mark.parametrize("override,key", [
    (["data=celeba", "data.split=training"], "data.split='training'"),
    (["data=folder", "data.split=test"], "data.split='test'"),
    (["data=celeba", "data.download=true"], "data.download=True"),
    (["data=celeba", "data.center_crop=-1"], "data.center_crop=-1"),
])
def test_bad_image_data_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match="expected") as err:
        validate(make_config(override))
    assert key in str(err.value)


# ----------------------------------------------------------------------------------------------- command line


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "wgan_lit.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_data_celeba_trains_from_the_command_line_and_writes_a_checkpoint(celeba, tmp_path):
    from wgan_lit.module import WGAN

    run = tmp_path / "run"
    proc = cli(["data=celeba", f"data.root={celeba}", "data.image_size=32", "data.batch_size=8",
                "max_gen_steps=2", "model.n_critic=2", "model.g_features=8", "model.d_features=8",
                "model.latent_dim=16", "model.n_fixed_samples=4", "trainer=cpu",
                "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Skipped 1 of 34 image files" in proc.stderr
    model = WGAN.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert model.gen_step == 2 and model.sample(2, seed=0).shape == (2, 3, 32, 32)
    assert cache_files(celeba / ".wgan_cache")


@pytest.mark.slow
def test_missing_celeba_on_the_command_line_is_one_message_and_exit_code_2(tmp_path):
    proc = cli(["data=celeba", f"data.root={tmp_path}/none", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "CelebA not found" in proc.stderr and "list_eval_partition.txt" in proc.stderr
    assert "Traceback" not in proc.stderr
