"""The data modules: full shuffled uint8 batches in [-1, 1] after transfer, a loader whose position survives a
checkpoint, CelebA and image folders through the cache, and their configs and command line."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.fabric.utilities.data import _set_sampler_epoch
from PIL import Image

import wgan_lit.image_cache as cache_mod
from tests.conftest import (
    REPO,
    assert_same_training_state,
    cache_files,
    idx_bytes,
    load,
    make_celeba,
    make_folder,
    picture,
    tiny_config,
    write_fake_fashion_mnist,
)
from wgan_lit.config import ConfigError, DataConfig, DataError, TrainConfig, register_configs, validate
from wgan_lit.data import (
    CachedImages,
    CelebADataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    InMemoryImages,
    ResumableLoader,
    build_datamodule,
    resize_uint8,
    to_unit_range,
)
from wgan_lit.image_files import SkippedFilesWarning, decode_image
from wgan_lit.train import train

# Tests that expect the skipped-file warning assert it with pytest.warns; elsewhere it is just noise.
pytestmark = [pytest.mark.usefixtures("no_system_copy"),
              pytest.mark.filterwarnings("ignore::wgan_lit.image_files.SkippedFilesWarning")]


# ------------------------------------------------------------------------------------------------------------


def module(root: Path, cls: type = CelebADataModule, **kwargs):
    """A CelebA (or folder) module, prepared and set up as Lightning does."""
    cfg = DataConfig(name=cls.dataset_name, root=str(root), **{"batch_size": 8, "image_size": 32, **kwargs})
    dm = cls(cfg)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def write_indexed_fashion_mnist(root: Path, n: int) -> Path:
    """Fashion-MNIST-format files whose image i is filled with the value i: a batch shows which images it holds."""
    assert n <= 256
    root.mkdir(parents=True, exist_ok=True)
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
    (root / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (root / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(n, np.uint8)))
    return root


def indices(batches: list[torch.Tensor]) -> list[list[int]]:
    return [b[:, 0, 0, 0].tolist() for b in batches]


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_reads_generated_idx_files_gzipped_or_raw(tmp_path, gz):
    root = write_fake_fashion_mnist(tmp_path, n_train=100, n_test=20, gz=gz)
    dm = FashionMNISTDataModule(DataConfig(root=str(root), batch_size=32))
    dm.prepare_data()
    dm.setup("fit")
    assert dm.channels == 1
    assert dm.images.shape == (100, 1, 28, 28) and dm.images.dtype == torch.uint8
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # drop_last: every critic step sees a full batch
    assert all(b.shape == (32, 1, 28, 28) and b.dtype == torch.uint8 for b in batches)
    x = dm.on_after_batch_transfer(batches[0], 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() > 0.9  # the full range is used


def test_the_test_split(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=40, n_test=24)
    dm = FashionMNISTDataModule(DataConfig(root=str(root), batch_size=8, split="test"))
    dm.setup("fit")
    assert dm.images.shape == (24, 1, 28, 28)


def test_resizes_the_whole_tensor_once(fake_fmnist):
    dm = FashionMNISTDataModule(DataConfig(root=str(fake_fmnist), batch_size=8, image_size=32))
    dm.setup("fit")
    assert dm.images.shape == (256, 1, 32, 32) and dm.images.dtype == torch.uint8
    assert next(iter(dm.train_dataloader())).shape == (8, 1, 32, 32)


def test_missing_fashion_mnist_is_reported_by_prepare_data(tmp_path):
    with pytest.raises(DataError, match="Fashion-MNIST not found"):
        FashionMNISTDataModule(DataConfig(root=str(tmp_path / "nowhere"))).prepare_data()


def test_batch_larger_than_dataset_is_an_error(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=10)
    with pytest.raises(DataError, match=r"data.batch_size=64 is larger than the dataset \(10 images\)"):
        FashionMNISTDataModule(DataConfig(root=str(root))).train_dataloader()


def seed_run(monkeypatch, seed: int) -> None:
    """seed_everything, as a run does (the loader's order follows it); monkeypatch undoes its environment."""
    monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
    monkeypatch.setenv("PL_SEED_WORKERS", "0")
    L.seed_everything(seed, verbose=False)


def one_pass(loader: ResumableLoader, epoch: int) -> list[list[int]]:
    """One epoch as Lightning's fit loop runs it: the sampler is told the epoch, then the loader is iterated."""
    _set_sampler_epoch(loader, epoch)
    return indices(list(loader))


def test_a_pass_shows_each_image_at_most_once_drops_the_rest_and_reshuffles(tmp_path):
    dm = FashionMNISTDataModule(DataConfig(root=str(write_indexed_fashion_mnist(tmp_path, 100)), batch_size=8))
    dm.setup("fit")
    loader = dm.train_dataloader()
    first, second = one_pass(loader, 0), one_pass(loader, 1)
    for epoch in (first, second):
        seen = [i for batch in epoch for i in batch]
        assert len(epoch) == 12 and len(seen) == 96 == len(set(seen))  # 100 // 8 full batches, 4 left out
    assert first != second and first != [list(range(i, i + 8)) for i in range(0, 96, 8)]


def test_the_order_follows_the_global_seed(tmp_path, monkeypatch):
    root = write_indexed_fashion_mnist(tmp_path, 64)

    def first_pass(seed: int) -> list[list[int]]:
        seed_run(monkeypatch, seed)
        dm = FashionMNISTDataModule(DataConfig(root=str(root), batch_size=8))
        dm.setup("fit")
        return one_pass(dm.train_dataloader(), 0)

    assert first_pass(0) == first_pass(0) != first_pass(1)


# ----------------------------------------------------------------------------------------------- resuming


@pytest.fixture
def fresh_loader(monkeypatch):
    """What a (resumed) run builds: after seed_everything, a new data module, set up without a trainer."""

    def build(root: Path, seed: int = 0) -> ResumableLoader:
        seed_run(monkeypatch, seed)
        dm = FashionMNISTDataModule(DataConfig(root=str(root), batch_size=8))
        dm.setup("fit")
        loader = dm.train_dataloader()
        assert isinstance(loader, ResumableLoader)
        return loader

    return build


def through_a_checkpoint(state: dict) -> dict:
    """The state as a resumed run gets it back: saved with torch.save, loaded with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("k", [0, 1, 5, 11])
def test_the_loaders_position_survives_state_dict_and_load_state_dict(tmp_path, fresh_loader, k):
    root = write_indexed_fashion_mnist(tmp_path, 100)  # 12 batches of 8 per pass
    uninterrupted = fresh_loader(root)
    pass1, pass2 = one_pass(uninterrupted, 0), one_pass(uninterrupted, 1)
    assert len(pass1) == len(pass2) == 12 and pass1 != pass2

    interrupted = fresh_loader(root)
    _set_sampler_epoch(interrupted, 0)
    it = iter(interrupted)
    taken = indices([next(it) for _ in range(k)])
    assert taken == pass1[:k]
    state = through_a_checkpoint(interrupted.state_dict())

    resumed = fresh_loader(root)
    resumed.load_state_dict(state)
    rest, following = one_pass(resumed, 0), one_pass(resumed, 1)
    assert rest == pass1[k:]
    assert following == pass2

    # Control: the same seed without load_state_dict starts the pass over, so the sequence differs.
    control = fresh_loader(root)
    control_first, control_second = one_pass(control, 0), one_pass(control, 1)
    assert control_first == pass1 and control_second == pass2  # same seed, same order: only the position is lost
    if k > 0:  # at k = 0 there is no position to lose
        assert (control_first + control_second)[: len(rest + following)] != rest + following


@pytest.mark.parametrize("exhausted", [False, True], ids=["after_the_last_batch", "after_stop_iteration"])
def test_a_position_at_the_end_of_a_pass_resumes_with_the_next_pass(tmp_path, fresh_loader, exhausted):
    """A checkpoint after the last batch of an epoch: the resumed run neither replays it nor skips the next."""
    root = write_indexed_fashion_mnist(tmp_path, 100)
    uninterrupted = fresh_loader(root)
    passes = [one_pass(uninterrupted, epoch) for epoch in range(3)]

    interrupted = fresh_loader(root)
    _set_sampler_epoch(interrupted, 0)
    if exhausted:
        list(interrupted)
    else:
        it = iter(interrupted)
        for _ in range(12):
            next(it)
    resumed = fresh_loader(root)
    resumed.load_state_dict(through_a_checkpoint(interrupted.state_dict()))
    assert one_pass(resumed, 1) == passes[1] and one_pass(resumed, 2) == passes[2]


# ----------------------------------------------------------------------------------------------- helpers


def test_to_unit_range_maps_0_and_255_to_minus_1_and_1():
    x = to_unit_range(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))


def test_resize_uint8_is_antialiased_and_a_no_op_at_the_same_size():
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    images[:, :, ::2] = 255  # stripes one pixel high average to gray when halved
    assert resize_uint8(images, 28) is images
    half = resize_uint8(images, 14)
    assert half.shape == (2, 1, 14, 14) and half.dtype == torch.uint8
    assert (abs(half[..., 1:-1, :].int() - 128) <= 1).all()  # inside the borders, which see fewer rows
    flat = torch.full((1, 3, 28, 28), 77, dtype=torch.uint8)
    assert (resize_uint8(flat, 64) == 77).all()


def test_in_memory_images_make_a_batch_in_one_index_op():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone()
    dataset = InMemoryImages(images)
    assert len(dataset) == 10 and torch.equal(dataset[3], images[3])
    assert torch.equal(dataset.__getitems__([7, 2, 7]), images[[7, 2, 7]])


def test_device_resident_is_a_no_op_on_cpu(fake_fmnist):
    cfg = DataConfig(root=str(fake_fmnist), batch_size=8, device_resident=True)
    alone = FashionMNISTDataModule(cfg)  # no trainer: the single-process path
    alone.setup("fit")
    assert alone.images.device.type == "cpu"
    dm = FashionMNISTDataModule(cfg)
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    dm.setup("fit")
    loaded = dm.images
    dm.setup("fit")  # Lightning may call setup again: nothing is reloaded or copied
    assert dm.images is loaded and dm.images.device.type == "cpu" and torch.equal(dm.images, alone.images)
    batch = next(iter(dm.train_dataloader()))
    assert batch.device.type == "cpu" and batch.shape == (8, 1, 28, 28)


@pytest.mark.parametrize("name,cls", [("fashion_mnist", FashionMNISTDataModule), ("celeba", CelebADataModule),
                                      ("folder", ImageFolderDataModule)])
def test_build_datamodule_picks_the_module_of_data_name(name, cls):
    cfg = DataConfig(name=name, root="somewhere", batch_size=4)
    dm = build_datamodule(cfg)
    assert type(dm) is cls and dm.cfg is cfg and dm.channels == (1 if name == "fashion_mnist" else 3)


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
def test_celeba_split_setting_serves_that_splits_images(celeba, split, files):
    dm = module(celeba, split=split, batch_size=5)
    folder = celeba / "celeba" / "img_align_celeba"
    expected = np.stack([decode_image(folder / f"{i:06d}.jpg", 32) for i in files])
    assert torch.equal(dm.images, torch.from_numpy(expected))
    assert len(list(dm.train_dataloader())) == 1


def test_split_all_and_a_missing_partition_file_use_the_whole_folder(tmp_path):
    with pytest.warns(SkippedFilesWarning, match="Skipped 1 of 44"):
        everything = module(make_celeba(tmp_path / "a"), split="all")
    with pytest.warns(SkippedFilesWarning, match="Skipped 1 of 44"):
        no_partition = module(make_celeba(tmp_path / "b", partition=False), split="train")
    assert len(everything.images) == len(no_partition.images) == 43
    assert torch.equal(everything.images, no_partition.images)


def test_missing_celeba_is_reported_by_prepare_data(tmp_path):
    with pytest.raises(DataError, match="CelebA not found.*does not exist"):
        CelebADataModule(DataConfig(name="celeba", root=str(tmp_path / "nowhere"))).prepare_data()


def test_batch_size_larger_than_the_dataset_is_an_error(celeba):
    dm = module(celeba, split="valid", batch_size=64)
    with pytest.raises(DataError, match="data.batch_size=64 is larger than the dataset \\(5 images\\)"):
        dm.train_dataloader()


def test_second_module_reads_the_cache_without_decoding(celeba, monkeypatch):
    first = module(celeba)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is complete")

    monkeypatch.setattr(cache_mod, "build_cache", no_decoding)
    monkeypatch.setattr(cache_mod, "decode_image", no_decoding)
    second = module(celeba)
    assert torch.equal(first.images, second.images) and second.cache_file == first.cache_file


def test_cache_dir_setting(celeba, tmp_path):
    dm = module(celeba, cache_dir=str(tmp_path / "elsewhere"))
    assert dm.cache_file.parent == tmp_path / "elsewhere" and not (celeba / ".wgan_cache").exists()
    manifest = dm.cache_file.with_suffix(".json").read_text()
    assert '"images": 33' in manifest and "000040.jpg" in manifest


def test_dataloader_workers_and_pickled_dataset(celeba):
    dm = module(celeba, num_workers=2)
    seen = torch.cat(list(dm.train_dataloader()))
    assert len(seen) == 32
    # every batch row is one of the cached images
    flat = dm.images.flatten(1)
    assert all((flat == row).all(1).any() for row in seen.flatten(1))
    dataset = pickle.loads(pickle.dumps(CachedImages(dm.cache_file, 32)))  # what a spawned worker gets
    assert torch.equal(dataset.images, dm.images)


# ----------------------------------------------------------------------------------------------- folders


def test_folder_reads_every_format_recursively_at_64px(tmp_path):
    root = make_folder(tmp_path / "imgs")
    dm = module(root, ImageFolderDataModule, batch_size=2, image_size=64)
    assert dm.channels == 3 and dm.images.shape == (5, 3, 64, 64)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2 and all(b.shape == (2, 3, 64, 64) and b.dtype == torch.uint8 for b in batches)
    assert cache_files(root / ".wgan_cache")  # beside the data by default, and not read back as an image
    assert len(module(root, ImageFolderDataModule, batch_size=2, image_size=64).images) == 5


def test_a_folder_has_no_splits_train_and_all_share_one_cache(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.fromarray(picture(i)).save(root / f"{i}.png")
    train = module(root, ImageFolderDataModule, batch_size=2, split="train")
    everything = module(root, ImageFolderDataModule, batch_size=2, split="all")
    assert train.cache_file == everything.cache_file and len(cache_files(root / ".wgan_cache")) == 1


def test_folder_errors_missing_empty_and_all_corrupt(tmp_path):
    def prepare(root: Path) -> None:
        ImageFolderDataModule(DataConfig(name="folder", root=str(root))).prepare_data()

    with pytest.raises(DataError, match="no such folder.*data.root=PATH"):
        prepare(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no image files"):
        prepare(tmp_path / "empty")
    (tmp_path / "empty" / "sub" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DataError, match="None of the 1 image files"):
        prepare(tmp_path / "empty")
    assert not list((tmp_path / "empty" / ".wgan_cache").glob("*.npy*"))  # no cache, not even a partial


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
    assert cfg.trainer["max_epochs"] == 5 and cfg.max_gen_steps == -1
    assert cfg.logger.sample_every_n_gen_steps * m.n_critic == 100  # every 100 batches
    default = validate(make_config([]))
    assert default.data.name == "fashion_mnist" and default.model.latent_dim == 100
    assert validate(make_config(["data=celeba"])).data.image_size == 64


@pytest.mark.parametrize("override,cls", [([], FashionMNISTDataModule), (["data=celeba"], CelebADataModule),
                                          (["data=folder"], ImageFolderDataModule)])
def test_each_data_config_builds_its_module(override, cls):
    cfg = validate(make_config(override)).data
    assert isinstance(cfg, DataConfig) and type(build_datamodule(cfg)) is cls


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


# ----------------------------------------------------------------------------------------------- resuming a run


@pytest.mark.parametrize("limit", [None, 2], ids=["whole-epochs", "limit_train_batches=2"])
@pytest.mark.parametrize("stop", [2, 1], ids=["stop-at-epoch-end", "stop-mid-epoch"])
def test_a_run_stopped_at_or_before_an_epoch_end_resumes_exactly(tmp_path, limit, stop):
    """Two epochs straight against the same run stopped at the first epoch's last batch (or mid-epoch) and
    resumed: the resumed second epoch reads that epoch's order from its start, also when
    trainer.limit_train_batches ends Lightning's epoch before the loader's pass ends."""
    # 2 batches of 16 per epoch, one generator step each (n_critic=1): the whole pass of 32 images, or the
    # first 2 batches of a pass of 4
    data = write_fake_fashion_mnist(tmp_path / "fmnist", n_train=64 if limit else 32)

    def config(max_gen_steps: int, ckpt_path: str = "") -> TrainConfig:
        cfg = tiny_config(data, max_gen_steps, ckpt_path, n_critic=1,
                          logger={"log_every_n_gen_steps": 100, "sample_every_n_gen_steps": 0})
        if limit:
            cfg.trainer["limit_train_batches"] = limit
        return cfg

    train(config(4), tmp_path / "straight")
    train(config(stop), tmp_path / "run")
    last = tmp_path / "run/checkpoints/last.ckpt"
    assert load(last)["wgan_counters"]["gen_step"] == stop
    train(config(4, str(last)), tmp_path / "run")

    a, b = load(tmp_path / "straight/checkpoints/last.ckpt"), load(last)
    assert a["wgan_counters"]["gen_step"] == 4
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"]
    assert_same_training_state(a, b)
