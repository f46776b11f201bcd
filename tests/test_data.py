"""The data modules: shuffled uint8 batches, the resumable loader, cached images, dataset classes, exact resumes."""

import io
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch

from tests import conftest as t
from tests.conftest import compose_train, load, write_fake_fashion_mnist
from wgan_lit import data
from wgan_lit.config import ConfigError, DataConfig, DataError, validate
from wgan_lit.data import DATAMODULES, InMemoryImages, ResumableLoader, build_datamodule, resize_uint8, to_unit_range
from wgan_lit.train import train

pytestmark = [pytest.mark.usefixtures("no_system_copy"),
              pytest.mark.filterwarnings("ignore::wgan_lit.images.SkippedFilesWarning")]  # test_images asserts it


def module(root: Path, name: str = "celeba", **kwargs) -> data.InMemoryDataModule:
    """Prepared and set up as Lightning does."""
    dm = build_datamodule(DataConfig(name=name, root=str(root), **{"batch_size": 8, "image_size": 32, **kwargs}))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def one_pass(loader: ResumableLoader, epoch: int) -> list[list[int]]:
    """One epoch as Lightning's fit loop runs it: the sampler is told the epoch, then the loader is iterated."""
    _set_sampler_epoch(loader, epoch)
    return [b[:, 0, 0, 0].tolist() for b in loader]


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """What a (resumed) run builds: seed_everything, a new module, its loader, over 100 images; image i is all i."""
    images = np.arange(100, dtype=np.uint8).repeat(784).reshape(100, 28, 28)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(t.idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(t.idx_bytes(np.zeros(100, np.uint8)))

    def build(seed: int = 0) -> ResumableLoader:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))  # monkeypatch undoes seed_everything's environment
        monkeypatch.setenv("PL_SEED_WORKERS", "0")
        L.seed_everything(seed, verbose=False)
        loader = module(tmp_path, "fashion_mnist", image_size=28).train_dataloader()
        assert isinstance(loader, ResumableLoader)
        return loader

    return build


def test_fashion_mnist_serves_full_uint8_batches_of_its_split_resized_once_mapped_to_unit_range_on_cpu(fake_fmnist):
    dm = module(fake_fmnist, "fashion_mnist", batch_size=32, image_size=28)
    assert dm.channels == 1 and dm.images.shape == (256, 1, 28, 28) and dm.images.dtype == torch.uint8
    batches = list(dm.train_dataloader())
    assert len(batches) == 8 and all(b.shape == (32, 1, 28, 28) and b.dtype == torch.uint8 for b in batches)
    x = dm.on_after_batch_transfer(batches[0], 0)
    assert x.dtype == torch.float32 and x.min() == -1 and 0.9 < x.max() <= 1  # the full range is used
    assert module(fake_fmnist, "fashion_mnist", split="test").images.shape == (64, 1, 32, 32)
    small = module(write_fake_fashion_mnist(fake_fmnist / "small", n_train=10), "fashion_mnist", batch_size=64)
    with pytest.raises(DataError, match=r"data.batch_size=64 is larger than the dataset \(10 images\)"):
        small.train_dataloader()
    cfg = DataConfig(root=str(fake_fmnist), batch_size=8, device_resident=True)
    alone, dm = build_datamodule(cfg), build_datamodule(cfg)
    alone.setup("fit")  # no trainer: the single-process path
    dm.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False)
    dm.setup("fit")
    loaded = dm.images
    dm.setup("fit")  # Lightning may call setup again: nothing is reloaded or copied
    assert dm.images is loaded and dm.images.device.type == "cpu" and torch.equal(dm.images, alone.images)
    assert next(iter(dm.train_dataloader())).device.type == "cpu"


@pytest.mark.parametrize("k", [0, 1, 5, 11, 12, "exhausted"])
def test_a_pass_is_shuffled_by_the_seed_and_the_loaders_position_survives_a_checkpoint(fresh_loader, k):
    """k of a pass's 12 batches taken (12: the last; exhausted: then StopIteration), saved with torch.save, loaded
    with weights_only=True as a resumed run does: the rest of the pass and the next follow, none replayed or skipped."""
    uninterrupted, interrupted = fresh_loader(), fresh_loader()
    passes = [one_pass(uninterrupted, epoch) for epoch in range(3)]
    for epoch in passes:  # each image at most once per pass, the rest left out, reshuffled each pass
        assert len(epoch) == 12 and len({i for batch in epoch for i in batch}) == 96  # 100 // 8 full batches
    assert passes[0] != passes[1] and passes[0] != [list(range(i, i + 8)) for i in range(0, 96, 8)]
    _set_sampler_epoch(interrupted, 0)
    it, taken = iter(interrupted), 12 if k == "exhausted" else k
    assert [next(it)[:, 0, 0, 0].tolist() for _ in range(taken)] == passes[0][:taken]
    assert k != "exhausted" or next(it, None) is None
    torch.save(interrupted.state_dict(), buffer := io.BytesIO())
    resumed = fresh_loader()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert taken == 12 or one_pass(resumed, 0) == passes[0][taken:]
    assert one_pass(resumed, 1) == passes[1] and one_pass(resumed, 2) == passes[2]
    if 0 < taken < 12:  # control: without load_state_dict the same seed starts the pass over; another seed differs
        assert one_pass(fresh_loader(), 0) == passes[0] != passes[0][taken:]
        assert one_pass(fresh_loader(seed=1), 0) != passes[0]


def test_to_unit_range_resize_uint8_and_in_memory_images():
    x = to_unit_range(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))
    stripes = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    stripes[:, :, ::2] = 255  # stripes one pixel high average to gray when halved
    half = resize_uint8(stripes, 14)
    assert resize_uint8(stripes, 28) is stripes and half.shape == (2, 1, 14, 14) and half.dtype == torch.uint8
    assert (abs(half[..., 1:-1, :].int() - 128) <= 1).all()  # antialiased, inside the borders (fewer rows)
    assert (resize_uint8(torch.full((1, 3, 28, 28), 77, dtype=torch.uint8), 64) == 77).all()
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).clone()
    dataset = InMemoryImages(images)
    assert len(dataset) == 10 and torch.equal(dataset[3], images[3])
    assert torch.equal(dataset.__getitems__([7, 2, 7]), images[[7, 2, 7]])  # one index op per batch
    assert torch.equal(pickle.loads(pickle.dumps(dataset)).images, images)


@pytest.mark.parametrize("name", DATAMODULES)
def test_each_dataset_class_declares_itself_its_config_is_checked_against_it_and_it_reports_missing_data(
        name, tmp_path):
    cls = DATAMODULES[name]
    missing = {"fashion_mnist": "Fashion-MNIST not found", "celeba": "CelebA not found.*does not exist"}
    with pytest.raises(DataError, match=missing.get(name, "no such folder")):
        build_datamodule(DataConfig(name=name, root=str(tmp_path / "nowhere"))).prepare_data()
    assert not (tmp_path / "nowhere").exists()  # nothing written
    assert cls.name == name and cls.channels == (1 if name == "fashion_mnist" else 3) and cls.splits[0] == "train"
    assert (cls.can_download, cls.has_classifier, cls.reference_split) == (
        (True, True, "test") if name == "fashion_mnist" else (False, False, "train"))
    for split in cls.splits:  # each split it declares is accepted, one it lacks named
        cfg = validate(compose_train([f"data={name}", f"data.split={split}"])).data
        assert type(build_datamodule(cfg)) is cls and cfg.name == name
    for bad in ("data.split=nope", *([] if cls.can_download else ["data.download=true"])):
        with pytest.raises(ConfigError, match="expected") as err:
            validate(compose_train([f"data={name}", bad]))
        assert str(err.value).startswith(bad.split("=")[0] + "=")


def test_a_new_dataset_is_a_class_and_one_entry(monkeypatch):
    class Noise(data.InMemoryDataModule):
        name, channels, splits = "noise", 3, ("train", "all")

        def load_images(self) -> torch.Tensor:
            return torch.randint(0, 256, (20, 3, self.cfg.image_size, self.cfg.image_size), dtype=torch.uint8)

    monkeypatch.setitem(DATAMODULES, "noise", Noise)
    dm = build_datamodule(validate(compose_train(["data.name=noise", "data.split=all", "data.batch_size=4"])).data)
    assert type(dm) is Noise and next(iter(dm.train_dataloader())).shape == (4, 3, 28, 28)
    assert torch.equal(dm.reference_images(), dm.images)
    with pytest.raises(ConfigError, match="data.split='test'"):
        validate(compose_train(["data.name=noise", "data.split=test"]))


def test_reference_images_fashion_mnists_test_set_by_default_or_a_datasets_own(fake_fmnist, monkeypatch, celeba):
    dm = build_datamodule(DataConfig(root=str(fake_fmnist), image_size=32))
    test, train_split = dm.reference_images(), dm.reference_images("train")
    assert test.shape == (64, 1, 32, 32) and test.dtype == torch.uint8 and train_split.shape == (256, 1, 32, 32)
    assert torch.equal(test, module(fake_fmnist, "fashion_mnist", split="test").images)
    monkeypatch.setattr(data, "MAX_REFERENCE", 30)  # the first MAX_REFERENCE images
    assert torch.equal(dm.reference_images("train"), train_split[:30])
    celeba_dm = build_datamodule(DataConfig(name="celeba", root=str(celeba), image_size=32))
    assert torch.equal(celeba_dm.reference_images(), module(celeba).images[:30])


def test_celeba_serves_its_splits_cached_images_as_rgb_batches(celeba, tmp_path):
    dm = module(celeba)
    assert dm.channels == 3 and dm.images.shape == (33, 3, 32, 32) and dm.images.dtype == torch.uint8
    batches = list(dm.train_dataloader())
    assert len(batches) == 4 and all(b.shape == (8, 3, 32, 32) and b.dtype == torch.uint8 for b in batches)
    x = dm.on_after_batch_transfer(batches[0], 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.max() - x.min() > 1
    assert len(module(celeba, split="valid", batch_size=5).images) == 5  # its split's (tests/test_images.py)
    elsewhere = module(celeba, cache_dir=str(tmp_path / "elsewhere"))
    assert elsewhere.cache_file.parent == tmp_path / "elsewhere" and dm.cache_file.parent == celeba / ".wgan_cache"
    workers = module(celeba, num_workers=2)  # each maps the cache itself: the dataset pickles as its path
    seen = torch.cat(list(workers.train_dataloader()))
    assert len(seen) == 32 and all((dm.images.flatten(1) == row).all(1).any() for row in seen.flatten(1))
    pickled = pickle.dumps(workers.train_dataloader().dataset)
    assert len(pickled) < 1000 and torch.equal(pickle.loads(pickled).images, dm.images)


def test_a_folder_reads_every_format_at_64px_and_train_and_all_share_one_cache(tmp_path):
    root = t.make_folder(tmp_path / "imgs")
    dm = module(root, "folder", batch_size=2, image_size=64)
    assert dm.channels == 3 and dm.images.shape == (5, 3, 64, 64) and len(list(dm.train_dataloader())) == 2
    everything = module(root, "folder", batch_size=2, image_size=64, split="all")
    assert everything.cache_file == dm.cache_file and len(t.cache_files(root / ".wgan_cache")) == 1


def test_experiment_celeba_64_is_the_second_seed_and_the_paper_stays_the_default(celeba, tmp_path):
    cfg = validate(compose_train(["experiment=celeba_64"]))
    m, d = cfg.model, cfg.data
    assert (d.name, d.image_size, d.batch_size) == ("celeba", 64, 64)
    assert (m.optimizer, m.lr_g, m.lr_d, m.latent_dim, m.clip_value, m.n_critic) == ("rmsprop", 5e-5, 5e-5, 128, .01, 5)
    assert (m.g_features, m.d_features, cfg.trainer["max_epochs"], cfg.max_gen_steps) == (64, 64, 5, -1)
    assert cfg.logger.sample_every_n_gen_steps * m.n_critic == 100  # every 100 batches
    default = validate(compose_train([]))
    assert default.data.name == "fashion_mnist" and default.model.latent_dim == 100
    tiny = t.tiny_config(celeba, 2, n_critic=2)  # data=celeba trains: a tiny run of 2 generator steps
    assert validate(compose_train(["data=celeba"])).data.image_size == 64
    tiny.data = validate(compose_train(["data=celeba", f"data.root={celeba}", "data.image_size=32",
                                        "data.batch_size=8"])).data
    train(tiny, tmp_path)
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["wgan_counters"]["gen_step"] == 2 and ckpt["hyper_parameters"]["channels"] == 3


@pytest.mark.parametrize("limit", [None, 2], ids=["whole-epochs", "limit_train_batches=2"])
def test_a_run_stopped_at_or_before_an_epoch_end_resumes_exactly(tmp_path, limit):
    """Stopped at the first epoch's end (2) or in it (1), then resumed: the second epoch reads its order from its
    start, also when trainer.limit_train_batches ends Lightning's epoch (2 batches) before the loader's pass (4)."""
    fmnist = write_fake_fashion_mnist(tmp_path / "fmnist", n_train=64 if limit else 32)  # batches of 16

    def run(steps: int, where: str, ckpt_path: str = "") -> dict:
        cfg = t.tiny_config(fmnist, steps, ckpt_path, n_critic=1,
                            logger={"log_every_n_gen_steps": 100, "sample_every_n_gen_steps": 0})
        cfg.trainer.update({"limit_train_batches": limit} if limit else {})
        train(cfg, tmp_path / where)
        return load(tmp_path / where / "checkpoints" / "last.ckpt")

    a = run(4, "straight")
    for stop in (2, 1):
        assert run(stop, f"stop{stop}")["wgan_counters"]["gen_step"] == stop
        b = run(4, f"stop{stop}", str(tmp_path / f"stop{stop}" / "checkpoints" / "last.ckpt"))
        assert (b["epoch"], a["wgan_counters"]["gen_step"]) == (a["epoch"], 4) == (1, 4)
        assert a["global_step"] == b["global_step"]
        t.assert_same_training_state(a, b)
