"""Exact resume: N generator steps straight == N/2, stop, resume, N/2 more; bad files fail before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import write_fake_fashion_mnist
from wgan_lit.checkpointing import CheckpointError
from wgan_lit.config import TrainConfig
from wgan_lit.resume import ResumableSampler
from wgan_lit.train import train

TAGS = ("critic/loss", "critic/wasserstein", "generator/loss")


def tiny_config(data: Path, max_gen_steps: int, ckpt_path: str = "", **model) -> TrainConfig:
    """128 images / batch 16 = 8 critic batches per epoch; n_critic=2 -> 4 generator steps per epoch."""
    c = TrainConfig()
    c.data.root, c.data.batch_size = str(data), 16
    c.model.g_features, c.model.d_features, c.model.latent_dim = 8, 8, 16
    c.model.n_fixed_samples, c.model.n_critic = 4, 2
    for k, v in model.items():
        setattr(c.model, k, v)
    c.trainer.accelerator, c.trainer.devices, c.trainer.deterministic = "cpu", 1, True
    c.trainer.enable_progress_bar, c.trainer.max_epochs = False, 10
    c.logger.log_every_n_gen_steps, c.logger.sample_every_n_gen_steps = 1, 3
    c.max_gen_steps, c.ckpt_path = max_gen_steps, ckpt_path
    return c


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()  # reads every event file of the directory: the first run's and the resumed run's
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in TAGS}


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["wgan_counters"] == b["wgan_counters"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # generator, critic, BatchNorm statistics, fixed noise
        assert torch.equal(value, b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for (ia, sa), (ib, sb) in zip(opt_a["state"].items(), opt_b["state"].items(), strict=True):
            assert ia == ib and all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("resume") / "data", n_train=128)


N = 5  # generator steps = 10 critic batches = 1.25 epochs, so the resumed half crosses an epoch boundary


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    run = tmp_path_factory.mktemp("straight")
    train(tiny_config(data, N), run)
    return run


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data) -> Path:
    """A run stopped by max_gen_steps after 3 generator steps = 6 of the epoch's 8 batches."""
    run = tmp_path_factory.mktemp("short")
    train(tiny_config(data, 3), run)
    return run


@pytest.mark.parametrize("half", [3, 4], ids=["stop-mid-epoch", "stop-at-epoch-end"])
def test_stopping_and_resuming_gives_the_same_weights_and_curves_as_training_straight(
        tmp_path, data, straight, half):
    train(tiny_config(data, half), tmp_path)
    last = tmp_path / "checkpoints/last.ckpt"
    assert load(last)["wgan_counters"]["gen_step"] == half
    train(tiny_config(data, N, ckpt_path=str(last)), tmp_path)

    a, b = load(straight / "checkpoints/last.ckpt"), load(last)
    assert b["wgan_counters"]["gen_step"] == N
    assert_same_training_state(a, b)
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    ca, cb = curves(straight), curves(tmp_path)
    assert [s for s, _ in ca["critic/loss"]] == list(range(1, N + 1))
    assert ca == cb


def test_the_sampler_continues_a_pass_where_training_stopped_and_then_starts_new_ones():
    sampler = ResumableSampler(10, seed=3)
    first = list(sampler)
    sampler.advance(4, batch_size=2)  # training used 4 of the 10
    state = sampler.state_dict()

    restored = ResumableSampler(10, seed=99)  # a fresh process would draw another seed; the state wins
    restored.load_state_dict(state)
    assert list(restored) == first[4:]  # the rest of the same pass
    second = list(restored)  # then a new pass with a new order
    assert sorted(second) == list(range(10)) and second != first

    sampler.advance(6, batch_size=2)  # the pass is used up: a resume starts the next pass
    done = ResumableSampler(10)
    done.load_state_dict(sampler.state_dict())
    assert list(done) == second


def test_checkpoints_hold_the_data_position_and_the_rng_states(short_run):
    ckpt = load(short_run / "checkpoints/last.ckpt")
    sampler_state = ckpt["FashionMNISTDataModule"]["sampler"]
    assert sampler_state["used"] == 6 * 16 and not sampler_state["finished"]  # 3 gen steps x 2 critic batches
    assert {"torch", "numpy", "python"} <= set(ckpt["rng_states"])
    # Lightning resumes with torch.load(weights_only=True): everything saved must pass it.
    torch.load(short_run / "checkpoints/last.ckpt", weights_only=True)


@pytest.mark.parametrize("case", ["missing", "folder", "truncated", "not-a-checkpoint", "other-tensor-file"])
def test_a_bad_ckpt_path_is_one_clear_error_naming_the_file_before_training(tmp_path, data, short_run, case):
    bad = {
        "missing": tmp_path / "nope.ckpt",
        "folder": tmp_path,
        "truncated": tmp_path / "truncated.ckpt",
        "not-a-checkpoint": tmp_path / "notes.ckpt",
        "other-tensor-file": tmp_path / "tensor.ckpt",
    }[case]
    raw = (short_run / "checkpoints/last.ckpt").read_bytes()
    if case == "truncated":
        bad.write_bytes(raw[: len(raw) // 2])
    elif case == "not-a-checkpoint":
        bad.write_text("hello")
    elif case == "other-tensor-file":
        torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError) as err:
        train(tiny_config(data, 2, ckpt_path=str(bad)), tmp_path / "run")
    assert str(bad) in str(err.value) and "ckpt_path" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written


def test_resuming_with_another_architecture_names_each_mismatch(tmp_path, data, short_run):
    last = short_run / "checkpoints/last.ckpt"
    with pytest.raises(CheckpointError) as err:
        train(tiny_config(data, 4, ckpt_path=str(last), latent_dim=32, d_features=4), tmp_path)
    msg = str(err.value)
    assert "model.latent_dim: checkpoint has 16, the config gives 32" in msg
    assert "model.d_features: checkpoint has 8, the config gives 4" in msg
    assert "g_features" not in msg and str(last) in msg
    assert not (tmp_path / "checkpoints").exists()


def test_a_resumed_run_takes_its_learning_rates_from_the_config_not_the_checkpoint(tmp_path, data, short_run):
    # e.g. after a divergence: resume from the last good checkpoint with a lower rate
    train(tiny_config(data, 4, ckpt_path=str(short_run / "checkpoints/last.ckpt"), lr_d=1e-5), tmp_path)
    opt_g, opt_d = load(tmp_path / "checkpoints/last.ckpt")["optimizer_states"]
    assert opt_d["param_groups"][0]["lr"] == 1e-5 and opt_g["param_groups"][0]["lr"] == 5e-5


def test_a_missing_ckpt_path_is_rejected_with_the_config_before_hydra_writes_anything(tmp_path):
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO
    from wgan_lit.config import ConfigError, register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"ckpt_path={tmp_path}/gone.ckpt"])
    with pytest.raises(ConfigError, match=r"ckpt_path='.*gone.ckpt': expected an existing checkpoint file"):
        validate(cfg)


def test_a_stop_asked_by_any_callback_mid_epoch_is_saved_at_that_batch(tmp_path, data):
    """trainer.max_time's Timer (like any callback after ours in the list) stops the run at a batch end."""
    import lightning as L

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.gen_step == 3:
                trainer.should_stop = True

    c = tiny_config(data, max_gen_steps=-1)  # 4 generator steps per epoch: step 3 is mid-epoch
    train(c, tmp_path / "run", extra_callbacks=[StopAt()])
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["wgan_counters"]["gen_step"] == 3
