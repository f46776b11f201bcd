"""train.py: a real run's files (the shared tiny run), exact resume, what a resume reuses, Trainer args, bad input."""

import dataclasses
import gzip
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests import conftest
from tests.conftest import TINY_ARGS, compose_train, curves, load, tiny_config
from wgan_lit import fast_path
from wgan_lit.checkpointing import CheckpointError
from wgan_lit.config import validate
from wgan_lit.module import WGAN
from wgan_lit.train import main, train

N = 5  # generator steps = 10 critic batches = 1.25 epochs, so a resumed run crosses an epoch boundary


def test_a_run_logs_on_generator_steps_and_stops_at_max_gen_steps_with_a_checkpoint_usable_without_hydra(tiny_run):
    log = (tiny_run / "train.log").read_text()
    for line in ("clip_value: 0.01", "n_critic: 2", "GPU available:", f"Run directory: {tiny_run}"):
        assert line in log, line  # the resolved config, Lightning's lines, ours
    (acc := EventAccumulator(str(tiny_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})).Reload()
    assert all([e.step for e in acc.Scalars(tag)] == list(range(1, 13)) for tag in conftest.TAGS)  # generator steps
    for loss, w in zip(acc.Scalars("critic/loss"), acc.Scalars("critic/wasserstein"), strict=True):
        assert w.value == pytest.approx(-loss.value)
    assert [e.step for e in acc.Images("samples")] == [0, 3, 6, 9, 12]  # the files: tests/test_timelapse.py
    last = tiny_run / "checkpoints" / "last.ckpt"
    model = WGAN.load_from_checkpoint(last, map_location="cpu")
    (images,) = model.sample(model.latents(5, seed=0))
    assert model.gen_step == 12 and images.shape == (5, 1, 28, 28) and -1 <= images.min() <= images.max() <= 1
    ckpt = load(last)
    (loader,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # Lightning saves the loader's state
    assert loader["_num_yielded"] == 8  # 256 images of 16: 12 generator steps x 2 = 24 batches, 8 into epoch 1
    assert len(ckpt["rng_states"]) == 1 and {"torch", "numpy", "python"} <= set(ckpt["rng_states"][0])
    runtime = ("precision", "cpu_threads", "channels_last", "compile", "fused_clamp")
    assert ckpt["hyper_parameters"]["clip_value"] == 0.01 and not set(runtime) & set(ckpt["hyper_parameters"])
    assert ckpt["wgan_runtime"] == {"precision": "32-true", "cpu_threads": 0, "channels_last": True, "compile": False,
                                    "fused_clamp": True}  # beside the hyperparameters, not among them
    torch.load(last, weights_only=True)  # Lightning resumes with weights_only=True: everything saved must pass it


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return conftest.write_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fmnist", n_train=128)


def run(data: Path, run_dir: Path, steps: int, ckpt_path: str = "", **model) -> Path:  # averaged; curves, no grids
    logger = {"log_every_n_gen_steps": 1, "sample_every_n_gen_steps": 0}
    train(tiny_config(data, steps, ckpt_path=ckpt_path, logger=logger, **{"ema_decay": 0.9, **model}), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    return run(data, tmp_path_factory.mktemp("straight"), N).parent.parent


def test_ctrl_c_saves_at_the_batch_boundary_and_resuming_gives_the_weights_average_and_curves_of_training_straight(
        tmp_path, data, straight, monkeypatch):
    real_step = WGAN.training_step

    def step_then_ctrl_c(self, batch, batch_idx):
        if self.gen_step == 2 and self.critic_step_in_iter == 1:  # the batch that completes generator step 3
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step must still finish
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(WGAN, "training_step", step_then_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        run(data, tmp_path, N)
    assert stop.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is gone again
    last = tmp_path / "checkpoints/last.ckpt"
    assert load(last)["wgan_counters"] == {"gen_step": 3, "critic_step_in_iter": 0}  # 6 of the epoch's 8 batches
    monkeypatch.setattr(WGAN, "training_step", real_step)
    a, b = load(straight / "checkpoints/last.ckpt"), load(run(data, tmp_path, N, str(last)))
    conftest.assert_same_training_state(a, b)  # generator, critic, their average (weights, BatchNorm, count), Adam
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert int(a["state_dict"]["generator_ema.n_averaged"]) == N  # one update per generator step
    ema = [k for k in a["state_dict"] if k.startswith("generator_ema.module.") and k.endswith("weight")]
    # the average is not the generator: comparing it checks something the generator's weights do not
    assert any(not torch.equal(a["state_dict"][k], a["state_dict"][k.replace("generator_ema.module.", "generator.")])
               for k in ema)
    assert [s for s, _ in curves(straight)["critic/loss"]] == list(range(1, N + 1))
    assert curves(straight) == curves(tmp_path)


def test_a_bad_ckpt_path_is_one_clear_error_naming_the_file_before_training(tmp_path, data, tiny_run):
    good = tiny_run / "checkpoints" / "last.ckpt"  # every kind of bad file: tests/test_checkpointing.py
    (bad := tmp_path / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        run(data, tmp_path / "run", 4, str(bad))
    assert str(bad) in str(err.value) and "ckpt_path" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written


def test_a_resume_takes_the_config_learning_rates_and_the_checkpoints_runtime_settings_not_the_probes_or_configs(
        tmp_path, tiny_run, monkeypatch, caplog):
    last = tiny_run / "checkpoints" / "last.ckpt"  # read: the resumed run writes into a directory of its own
    cfg = tiny_config(tiny_run.parent / "fmnist", 13, str(last), {"log_every_n_gen_steps": 1,
                      "sample_every_n_gen_steps": 0}, ema_decay=0.9, lr_d=1e-5)  # a lower rate, e.g. after a divergence
    cfg.cpu_threads, cache = 1, tmp_path / "fast_path.json"
    cfg.fast_path.probe, cfg.fast_path.cache = True, str(cache)
    bf16 = {"precision": "bf16-mixed", "threads": 1, "channels_last": False, "compile": False}
    cache.write_text(json.dumps({fast_path.machine_key("cpu"): {fast_path.workload_key(cfg, 1): {
        "choice": bf16, "compile_tried": True}}}))
    assert fast_path.resolve(dataclasses.replace(cfg, ckpt_path=""), 1).trainer["precision"] == "bf16-mixed"
    for name in ("probe", "time_candidate"):  # nor may it time anything
        monkeypatch.setattr(fast_path, name, lambda *a, **k: pytest.fail("probed on resume"), raising=False)
    with caplog.at_level(logging.INFO, logger="wgan_lit"):
        train(cfg, tmp_path / "run")
    ckpt = load(tmp_path / "run" / "checkpoints/last.ckpt")
    assert ckpt["wgan_counters"]["gen_step"] == 13
    opt_g, opt_d = ckpt["optimizer_states"]
    assert opt_d["param_groups"][0]["lr"] == 1e-5 and opt_g["param_groups"][0]["lr"] == 5e-5
    assert ckpt["wgan_runtime"] == load(last)["wgan_runtime"] and ckpt["wgan_runtime"]["precision"] == "32-true"
    assert ("Runtime: trainer.precision=32-true cpu_threads=0 runtime.fused_clamp=True runtime.channels_last=True "
            "runtime.compile=False") in caplog.text


def test_any_trainer_argument_is_passed_on_cpu_threads_applied_and_fast_dev_run_writes_no_checkpoint(
        tmp_path, data, caplog, monkeypatch):
    """Neither Trainer argument is a schema key of ours: they reach lightning.Trainer (8 batches an epoch here)."""
    args = [*TINY_ARGS, f"data.root={data}", "trainer=cpu", "trainer.max_epochs=2", "logger.sample_every_n_gen_steps=0"]
    monkeypatch.setattr(torch, "set_num_threads", (threads := []).append)
    train(validate(compose_train([*args, "trainer.limit_train_batches=3", "cpu_threads=1"])), tmp_path / "limited")
    limited = load(tmp_path / "limited/checkpoints/last.ckpt")
    assert limited["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 2 * 3
    assert limited["epoch"] == 1 and threads == [1] and limited["wgan_runtime"]["cpu_threads"] == 1
    count, batches = type("Count", (L.Callback,), {"on_train_batch_end": lambda self, *_: batches.append(1)}), []
    train(validate(compose_train([*args, "trainer.fast_dev_run=4"])), tmp_path / "dev", [count()])
    assert "Running in `fast_dev_run` mode: will run the requested loop using 4 batch(es)" in caplog.text
    assert len(batches) == 3  # its max_steps=4 counts optimizer steps: 3 critic steps and 1 generator step
    assert not (tmp_path / "dev/checkpoints").exists() and threads == [1]  # Lightning's rule; 0: torch's threads


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_bad_data_is_one_error_exit_2_before_hydra_writes_anything(tmp_path, data, monkeypatch, capsys,
                                                                   no_system_copy, case):
    root = tmp_path / "data"
    if case == "corrupt":
        shutil.copytree(data, root)
        raw = bytearray(gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes()))
        raw[3] = 9  # wrong magic number
        (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(bytes(raw)))
    (work := tmp_path / "work").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["train", "trainer=cpu", f"data.root={root}", *TINY_ARGS])
    conftest.assert_one_error(*conftest.call(lambda _: main(), [], capsys),  # the missing data's says where it looked
                              {"corrupt": "wrong magic number"}.get(case, "Fashion-MNIST not found"),
                              one_line=case == "corrupt")
    assert list(work.iterdir()) == []  # no outputs/<date>/<time>/ with tensorboard/ and train.log
