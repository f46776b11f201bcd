"""train.py: what a real run writes (the shared tiny run), exact resume in-process (stopped by max_gen_steps, at an
epoch's end, by Ctrl-C), the runtime settings a resume reuses, Trainer arguments, and bad input on the command line."""

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

RUNTIME = ("precision", "cpu_threads", "channels_last", "compile", "fused_clamp")
N = 5  # generator steps = 10 critic batches = 1.25 epochs, so a resumed half crosses an epoch boundary


def test_a_run_logs_to_its_dir_on_generator_steps_and_stops_at_max_gen_steps_with_a_checkpoint_for_hydra_less_use(
        tiny_run):
    log = (tiny_run / "train.log").read_text()
    for line in ("clip_value: 0.01", "n_critic: 2", "GPU available:", f"Run directory: {tiny_run}"):
        assert line in log, line  # the resolved config, Lightning's lines, ours
    acc = EventAccumulator(str(tiny_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert all([e.step for e in acc.Scalars(tag)] == list(range(1, 13)) for tag in conftest.TAGS)  # generator steps
    for loss, w in zip(acc.Scalars("critic/loss"), acc.Scalars("critic/wasserstein"), strict=True):
        assert w.value == pytest.approx(-loss.value)
    assert [e.step for e in acc.Images("samples")] == [0, 3, 6, 9, 12] and "timelapse" in acc.Tags()["images"]
    grids = sorted(p.name for p in (tiny_run / "samples").glob("*.png"))
    assert grids == [f"gen_{s:06d}.png" for s in (0, 3, 6, 9, 12)] and (tiny_run / "timelapse.gif").is_file()
    last = tiny_run / "checkpoints" / "last.ckpt"
    model = WGAN.load_from_checkpoint(last, map_location="cpu")
    (images,) = model.sample(model.latents(5, seed=0))
    assert model.gen_step == 12 and images.shape == (5, 1, 28, 28) and -1 <= images.min() <= images.max() <= 1
    ckpt = load(last)
    (loader,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # Lightning saves the loader's state
    assert loader["_num_yielded"] == 8  # 256 images of 16: 12 generator steps x 2 = 24 batches, 8 into epoch 1
    assert len(ckpt["rng_states"]) == 1 and {"torch", "numpy", "python"} <= set(ckpt["rng_states"][0])
    assert ckpt["hyper_parameters"]["clip_value"] == 0.01 and not set(RUNTIME) & set(ckpt["hyper_parameters"])
    assert ckpt["wgan_runtime"] == {"precision": "32-true", "cpu_threads": 0, "channels_last": True, "compile": False,
                                    "fused_clamp": True}  # beside the hyperparameters, not among them
    torch.load(last, weights_only=True)  # Lightning resumes with weights_only=True: everything saved must pass it


# ---- exact resume on one process ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return conftest.write_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fmnist", n_train=128)


def run(data: Path, run_dir: Path, steps: int, ckpt_path: str = "", **model) -> Path:
    """The tiny run with the averaged generator, curves every step and no grids, to ``steps``; its last.ckpt."""
    logger = {"log_every_n_gen_steps": 1, "sample_every_n_gen_steps": 0}
    train(tiny_config(data, steps, ckpt_path=ckpt_path, logger=logger, **{"ema_decay": 0.9, **model}), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, data) -> Path:
    return run(data, tmp_path_factory.mktemp("straight"), N).parent.parent


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data) -> Path:
    """Stopped by max_gen_steps after 3 generator steps = 6 of the epoch's 8 batches; its last.ckpt."""
    return run(data, tmp_path_factory.mktemp("short"), 3)


@pytest.mark.parametrize("half", [3, 4], ids=["stop-mid-epoch", "stop-at-epoch-end"])
def test_stopping_and_resuming_gives_the_same_weights_average_and_curves_as_training_straight(
        tmp_path, data, straight, short_run, half):
    if half == 3:
        shutil.copytree(short_run.parent.parent, tmp_path, dirs_exist_ok=True)
    last = run(data, tmp_path, half) if half == 4 else tmp_path / "checkpoints" / "last.ckpt"
    assert load(last)["wgan_counters"]["gen_step"] == half
    a, b = load(straight / "checkpoints/last.ckpt"), load(run(data, tmp_path, N, str(last)))
    conftest.assert_same_training_state(a, b)  # generator, critic, their average (weights, BatchNorm, count), Adam
    assert a["epoch"] == b["epoch"] and a["global_step"] == b["global_step"]
    assert int(a["state_dict"]["generator_ema.n_averaged"]) == N  # one update per generator step
    ema = [k for k in a["state_dict"] if k.startswith("generator_ema.module.") and k.endswith("weight")]
    # the average is not the generator: comparing it checks something the generator's weights do not
    assert any(not torch.equal(a["state_dict"][k], a["state_dict"][k.replace("generator_ema.module.", "generator.")])
               for k in ema)
    assert [s for s, _ in curves(straight)["critic/loss"]] == list(range(1, N + 1)) and curves(straight) == curves(
        tmp_path)


def test_ctrl_c_saves_at_the_batch_boundary_and_resuming_matches_an_uninterrupted_run(
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
    assert load(last)["wgan_counters"] == {"gen_step": 3, "critic_step_in_iter": 0}
    monkeypatch.setattr(WGAN, "training_step", real_step)
    run(data, tmp_path, N, str(last))
    conftest.assert_same_training_state(load(straight / "checkpoints/last.ckpt"), load(last))
    assert curves(straight) == curves(tmp_path)


@pytest.mark.parametrize("case", ["missing", "folder", "truncated", "not-a-checkpoint", "other-tensor-file"])
def test_a_bad_ckpt_path_is_one_clear_error_naming_the_file_before_training(tmp_path, data, short_run, case):
    bad = {"missing": tmp_path / "nope.ckpt", "folder": tmp_path, "truncated": tmp_path / "truncated.ckpt",
           "not-a-checkpoint": tmp_path / "notes.ckpt", "other-tensor-file": tmp_path / "tensor.ckpt"}[case]
    if case == "truncated":
        bad.write_bytes(short_run.read_bytes()[: short_run.stat().st_size // 2])
    elif case == "not-a-checkpoint":
        bad.write_text("hello")
    elif case == "other-tensor-file":
        torch.save({"weights": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError) as err:
        run(data, tmp_path / "run", 4, str(bad))
    assert str(bad) in str(err.value) and "ckpt_path" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written


# ---- runtime settings: beside the hyperparameters, reused by a resume ---------------------------------------

def test_a_resume_takes_the_config_learning_rates_and_the_checkpoints_runtime_settings_not_the_probes_or_configs(
        tmp_path, data, short_run, monkeypatch, caplog):
    cfg = tiny_config(data, 4, ckpt_path=str(short_run), ema_decay=0.9, lr_d=1e-5)  # e.g. after a divergence
    cfg.cpu_threads, cache = 1, tmp_path / "fast_path.json"
    cfg.fast_path.probe, cfg.fast_path.cache = True, str(cache)
    bf16 = {"precision": "bf16-mixed", "threads": 1, "channels_last": False, "compile": False}
    cache.write_text(json.dumps({fast_path.machine_key("cpu"): {fast_path.workload_key(cfg, 1): {
        "choice": bf16, "compile_tried": True}}}))
    assert fast_path.resolve(dataclasses.replace(cfg, ckpt_path=""), 1).trainer["precision"] == "bf16-mixed"
    for name in ("probe", "time_candidate"):  # nor may it time anything
        monkeypatch.setattr(fast_path, name, lambda *a, **k: pytest.fail("probed on resume"), raising=False)
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    with caplog.at_level(logging.INFO, logger="wgan_lit"):
        train(cfg, tmp_path / "run")
    ckpt = load(tmp_path / "run" / "checkpoints/last.ckpt")
    assert ckpt["wgan_counters"]["gen_step"] == 4 and threads == []  # the checkpoint's cpu_threads=0: torch's own
    opt_g, opt_d = ckpt["optimizer_states"]
    assert opt_d["param_groups"][0]["lr"] == 1e-5 and opt_g["param_groups"][0]["lr"] == 5e-5
    assert ckpt["wgan_runtime"] == load(short_run)["wgan_runtime"]
    assert ckpt["wgan_runtime"]["precision"] == "32-true"  # what the resumed Trainer ran in
    assert ("Runtime: trainer.precision=32-true cpu_threads=0 runtime.fused_clamp=True runtime.channels_last=True "
            "runtime.compile=False") in caplog.text


def test_an_old_checkpoint_with_runtime_switches_among_its_hyperparameters_resumes(tmp_path, data, short_run,
                                                                                    monkeypatch):
    old = load(short_run)
    old["hyper_parameters"].update(channels_last=True, compile=False, fused_clamp=True)  # as written before
    del old["wgan_runtime"]
    torch.save(old, tmp_path / "old.ckpt")
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    cfg = tiny_config(data, 4, ckpt_path=str(tmp_path / "old.ckpt"), ema_decay=0.9)
    cfg.cpu_threads = 1  # with no record in the checkpoint, the config decides
    train(cfg, tmp_path / "run")
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert ckpt["wgan_counters"]["gen_step"] == 4 and not set(RUNTIME) & set(ckpt["hyper_parameters"])
    assert (ckpt["wgan_runtime"]["precision"], ckpt["wgan_runtime"]["cpu_threads"], threads) == ("32-true", 1, [1])


# ---- Trainer arguments, and bad input on the command line --------------------------------------------------

def test_any_trainer_argument_is_passed_on_and_fast_dev_run_writes_no_checkpoint(tmp_path, data, caplog):
    """Neither is a schema key of ours: they reach lightning.Trainer (8 batches an epoch here otherwise)."""
    args = [*TINY_ARGS, f"data.root={data}", "trainer=cpu", "trainer.max_epochs=2", "logger.sample_every_n_gen_steps=0"]
    train(validate(compose_train([*args, "trainer.limit_train_batches=3"])), tmp_path / "limited")
    limited = load(tmp_path / "limited/checkpoints/last.ckpt")
    assert limited["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 2 * 3
    assert limited["epoch"] == 1  # the second epoch, of 3 batches too
    batches = []

    class Count(L.Callback):
        def on_train_batch_end(self, *_):
            batches.append(1)

    train(validate(compose_train([*args, "trainer.fast_dev_run=4"])), tmp_path / "dev", [Count()])
    assert "Running in `fast_dev_run` mode: will run the requested loop using 4 batch(es)" in caplog.text
    assert len(batches) == 3  # its max_steps=4 counts optimizer steps: 3 critic steps and 1 generator step
    assert not (tmp_path / "dev/checkpoints").exists()  # Lightning's own rule for fast_dev_run


@pytest.mark.parametrize("case", ["missing", "corrupt"])
def test_bad_data_is_one_error_line_exit_2_before_hydra_writes_anything(tmp_path, data, monkeypatch, capsys,
                                                                        no_system_copy, case):
    root = tmp_path / "data"
    if case == "corrupt":
        shutil.copytree(data, root)
        images = root / "train-images-idx3-ubyte.gz"
        raw = bytearray(gzip.decompress(images.read_bytes()))
        raw[3] = 9  # wrong magic number
        images.write_bytes(gzip.compress(bytes(raw)))
    (work := tmp_path / "work").mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["train", "trainer=cpu", f"data.root={root}", *TINY_ARGS])
    conftest.assert_one_error(*conftest.call(lambda _: main(), [], capsys),
                     "wrong magic number" if case == "corrupt" else "Fashion-MNIST not found",
                     one_line=case == "corrupt")  # the missing data's message says where it looked and how to get it
    assert list(work.iterdir()) == []  # no outputs/<date>/<time>/ with tensorboard/ and train.log
