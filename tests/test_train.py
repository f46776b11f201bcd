"""train.py: real runs through the command line and in-process, exact resume (one process and DDP), interrupts,
Trainer arguments passed on, DDP sweeps."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import (
    ENV,
    PROBE,
    TINY_ARGS,
    assert_same_training_state,
    compose_train,
    curves,
    load,
    probe_reports,
    run_cli,
    tiny_config,
    write_fake_fashion_mnist,
)
from wgan_lit import fast_path
from wgan_lit.checkpointing import CheckpointError, read_checkpoint
from wgan_lit.module import WGAN
from wgan_lit.train import ddp_job, train

TRAIN = ["-m", "wgan_lit.train"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fmnist", n_train=128)


# ---- one run through the command line ------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    run_dir = tmp / "run"
    proc = run_cli([*TRAIN, "trainer=cpu", f"data.root={data}", f"hydra.run.dir={run_dir}", "max_gen_steps=6",
                    "logger.log_every_n_gen_steps=2", "logger.sample_every_n_gen_steps=3", *TINY_ARGS], cwd=tmp)
    return run_dir, proc


@pytest.mark.slow
def test_run_prints_the_resolved_config(finished_run):
    _, proc = finished_run
    assert "clip_value: 0.01" in proc.stderr and "n_critic: 2" in proc.stderr


@pytest.mark.slow
def test_train_log_holds_the_console_log(finished_run):
    run_dir, proc = finished_run
    log = (run_dir / "train.log").read_text()
    for line in ("clip_value: 0.01", "GPU available:", f"Run directory: {run_dir}"):  # ours, Lightning's
        assert line in log and line in proc.stderr, line


@pytest.mark.slow
def test_run_writes_tensorboard_scalars_on_generator_steps_and_sample_images(finished_run):
    run_dir, _ = finished_run
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("critic/loss", "critic/wasserstein", "generator/loss"):
        assert [e.step for e in acc.Scalars(tag)] == [2, 4, 6]  # x axis = generator steps
    for loss, w in zip(acc.Scalars("critic/loss"), acc.Scalars("critic/wasserstein"), strict=True):
        assert w.value == pytest.approx(-loss.value)
    assert [e.step for e in acc.Images("samples")] == [0, 3, 6]
    assert "timelapse" in tags["images"] and (run_dir / "timelapse.gif").is_file()
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [
        "gen_000000.png", "gen_000003.png", "gen_000006.png"]


@pytest.mark.slow
def test_run_stops_at_max_gen_steps_and_its_checkpoint_reloads_without_hydra(finished_run):
    run_dir, _ = finished_run
    last = run_dir / "checkpoints" / "last.ckpt"
    model = WGAN.load_from_checkpoint(last, map_location="cpu")
    assert model.gen_step == 6
    images = model.sample(5, seed=0)
    assert images.shape == (5, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    ckpt = load(last)
    assert ckpt["hyper_parameters"]["clip_value"] == 0.01 and ckpt["wgan_counters"]["gen_step"] == 6


@pytest.mark.slow
def test_any_trainer_argument_is_passed_on(tmp_path, data):
    """trainer.limit_train_batches is no schema key of ours: it reaches lightning.Trainer and bounds the run."""
    common = [*TRAIN, "trainer=cpu", f"data.root={data}", "trainer.max_epochs=2", *TINY_ARGS]
    run_cli([*common, "trainer.limit_train_batches=3", f"hydra.run.dir={tmp_path}/limited"], cwd=tmp_path)
    run_cli([*common, f"hydra.run.dir={tmp_path}/control"], cwd=tmp_path)  # control: the same without it
    limited = load(tmp_path / "limited/checkpoints/last.ckpt")
    control = load(tmp_path / "control/checkpoints/last.ckpt")
    assert limited["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 2 * 3
    assert control["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 2 * 8
    assert limited["epoch"] == control["epoch"] == 1


@pytest.mark.slow
def test_fast_dev_run_runs_that_many_batches_and_writes_no_checkpoint(tmp_path, data):
    proc = run_cli([*TRAIN, "trainer=cpu", f"data.root={data}", "trainer.fast_dev_run=4", *TINY_ARGS,
                    f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert "Running in `fast_dev_run` mode: will run the requested loop using 4 batch(es)" in proc.stdout + proc.stderr
    assert not (tmp_path / "run/checkpoints").exists()  # Lightning's own rule for fast_dev_run


@pytest.mark.slow
def test_missing_data_is_one_clear_error_before_training(tmp_path):
    proc = run_cli(["-c", "import wgan_lit.fashion_mnist as f, sys; f.SYSTEM_DIRS.clear(); sys.argv[1:] = "
                    f"['data.root={tmp_path}/none', 'hydra.run.dir={tmp_path}/run']; "
                    "from wgan_lit.train import main; main()"], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "Fashion-MNIST not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_corrupt_data_fails_in_one_line_and_leaves_no_run_directory(tmp_path, data):
    import gzip
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    images = bad / "train-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(images.read_bytes()))
    raw[3] = 9  # wrong magic number
    images.write_bytes(gzip.compress(bytes(raw)))
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli([*TRAIN, "trainer=cpu", f"data.root={bad}", *TINY_ARGS], cwd=work, check=False)
    assert proc.returncode == 2 and "wrong magic number" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert list(work.iterdir()) == []  # no outputs/<date>/<time>/ with tensorboard/ and train.log


@pytest.mark.slow
def test_a_resume_that_cannot_start_leaves_the_runs_files_untouched(tmp_path, finished_run):
    run_dir, _ = finished_run
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli([*TRAIN, "trainer=cpu", *TINY_ARGS, "model.latent_dim=32", f"hydra.run.dir={run_dir}",
                    f"ckpt_path={run_dir}/checkpoints/last.ckpt"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "model.latent_dim: checkpoint has 16, the config gives 32" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


# ---- exact resume on one process ------------------------------------------------------------------------

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


def test_the_averaged_generator_resumes_exactly(tmp_path, data):
    """model.ema_decay: the average is checkpointed (weights, BatchNorm buffers, count) and goes on exactly."""
    straight = tmp_path / "straight"
    train(tiny_config(data, N, ema_decay=0.9), straight)
    train(tiny_config(data, 3, ema_decay=0.9), tmp_path / "halves")
    last = tmp_path / "halves" / "checkpoints/last.ckpt"
    train(tiny_config(data, N, ckpt_path=str(last), ema_decay=0.9), tmp_path / "halves")
    a, b = load(straight / "checkpoints/last.ckpt"), load(last)
    ema = [k for k in a["state_dict"] if k.startswith("generator_ema.")]
    assert int(a["state_dict"]["generator_ema.n_averaged"]) == N  # one update per generator step
    # the average is not the generator: comparing it checks something the generator's weights do not
    assert any(not torch.equal(a["state_dict"][k], a["state_dict"][k.replace("generator_ema.module.", "generator.")])
               for k in ema if k.startswith("generator_ema.module.") and k.endswith("weight"))
    assert_same_training_state(a, b)


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


def test_checkpoints_hold_the_loaders_position_and_the_rng_states(short_run):
    ckpt = load(short_run / "checkpoints/last.ckpt")
    (loader,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]  # Lightning saves the loader's state
    assert loader["_num_yielded"] == 6  # 3 generator steps x 2 critic batches
    assert len(ckpt["rng_states"]) == 1 and {"torch", "numpy", "python"} <= set(ckpt["rng_states"][0])
    # Lightning resumes with torch.load(weights_only=True): everything saved must pass it.
    torch.load(short_run / "checkpoints/last.ckpt", weights_only=True)


@pytest.mark.parametrize("case", ["missing", "folder", "truncated", "not-a-checkpoint", "other-tensor-file"])
def test_a_bad_ckpt_path_is_one_clear_error_naming_the_file_before_training(tmp_path, data, short_run, case):
    bad = {"missing": tmp_path / "nope.ckpt", "folder": tmp_path, "truncated": tmp_path / "truncated.ckpt",
           "not-a-checkpoint": tmp_path / "notes.ckpt", "other-tensor-file": tmp_path / "tensor.ckpt"}[case]
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


def test_a_resumed_run_takes_its_learning_rates_from_the_config_not_the_checkpoint(tmp_path, data, short_run):
    # e.g. after a divergence: resume from the last good checkpoint with a lower rate
    train(tiny_config(data, 4, ckpt_path=str(short_run / "checkpoints/last.ckpt"), lr_d=1e-5), tmp_path)
    opt_g, opt_d = load(tmp_path / "checkpoints/last.ckpt")["optimizer_states"]
    assert opt_d["param_groups"][0]["lr"] == 1e-5 and opt_g["param_groups"][0]["lr"] == 5e-5


# ---- runtime settings: beside the hyperparameters, reused by a resume ---------------------------------------

RUNTIME = ("precision", "cpu_threads", "channels_last", "compile", "fused_clamp")


def test_a_checkpoint_records_its_runtime_settings_beside_the_hyperparameters_not_among_them(short_run):
    ckpt = load(short_run / "checkpoints/last.ckpt")
    assert not set(RUNTIME) & set(ckpt["hyper_parameters"]) and ckpt["hyper_parameters"]["clip_value"] == 0.01
    assert ckpt["wgan_runtime"] == {"precision": "32-true", "cpu_threads": 0, "channels_last": True,
                                    "compile": False, "fused_clamp": True}
    assert WGAN.load_from_checkpoint(short_run / "checkpoints/last.ckpt", map_location="cpu").gen_step == 3


def test_a_resume_with_the_probe_on_goes_on_in_the_checkpoints_float32_where_the_cache_says_bf16(
        tmp_path, data, short_run, monkeypatch, caplog):
    cfg = tiny_config(data, 4, ckpt_path=str(short_run / "checkpoints/last.ckpt"))
    cache = tmp_path / "fast_path.json"
    cfg.fast_path.probe, cfg.fast_path.cache = True, str(cache)
    bf16 = {"precision": "bf16-mixed", "threads": 1, "channels_last": False, "compile": False}
    cache.write_text(json.dumps({fast_path.machine_key("cpu"): {fast_path.workload_key(cfg, 1): {
        "choice": bf16, "compile_tried": True}}}))
    assert fast_path.resolve(dataclasses.replace(cfg, ckpt_path=""), 1).trainer["precision"] == "bf16-mixed"
    for name in ("probe", "time_candidate"):  # nor may it time anything
        monkeypatch.setattr(fast_path, name, lambda *a, **k: pytest.fail("probed on resume"))
    with caplog.at_level(logging.INFO, logger="wgan_lit"):
        train(cfg, tmp_path / "run")
    ckpt = load(tmp_path / "run" / "checkpoints/last.ckpt")
    assert ckpt["wgan_counters"]["gen_step"] == 4
    assert ckpt["wgan_runtime"] == load(short_run / "checkpoints/last.ckpt")["wgan_runtime"]
    assert ckpt["wgan_runtime"]["precision"] == "32-true"  # what the resumed Trainer ran in
    assert ("Runtime: trainer.precision=32-true cpu_threads=0 runtime.fused_clamp=True runtime.channels_last=True "
            "runtime.compile=False") in caplog.text


def test_an_old_checkpoint_with_runtime_switches_among_its_hyperparameters_resumes(tmp_path, data, short_run):
    old = load(short_run / "checkpoints/last.ckpt")
    old["hyper_parameters"].update(channels_last=True, compile=False, fused_clamp=True)  # as written before
    del old["wgan_runtime"]
    torch.save(old, tmp_path / "old.ckpt")
    train(tiny_config(data, 4, ckpt_path=str(tmp_path / "old.ckpt")), tmp_path / "run")
    ckpt = load(tmp_path / "run" / "checkpoints/last.ckpt")
    assert ckpt["wgan_counters"]["gen_step"] == 4 and not set(RUNTIME) & set(ckpt["hyper_parameters"])
    assert ckpt["wgan_runtime"]["precision"] == "32-true"


def test_ctrl_c_saves_at_the_batch_boundary_and_resuming_matches_an_uninterrupted_run(
        tmp_path, data, straight, monkeypatch):
    real_step = WGAN.training_step

    def step_then_ctrl_c(self, batch, batch_idx):
        if self.gen_step == 2 and self.critic_step_in_iter == 1:  # the batch that completes generator step 3
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step must still finish
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(WGAN, "training_step", step_then_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        train(tiny_config(data, N), tmp_path)
    assert stop.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is gone again
    last = tmp_path / "checkpoints/last.ckpt"
    assert load(last)["wgan_counters"] == {"gen_step": 3, "critic_step_in_iter": 0}

    monkeypatch.setattr(WGAN, "training_step", real_step)
    train(tiny_config(data, N, ckpt_path=str(last)), tmp_path)
    assert_same_training_state(load(straight / "checkpoints/last.ckpt"), load(last))
    assert curves(straight) == curves(tmp_path)


def wait_for_checkpoint(path: Path, proc: subprocess.Popen, min_step: int, timeout: float = 180) -> int:
    """Block until ``path`` holds a checkpoint at generator step >= min_step; return that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if path.is_file():
            try:
                step = read_checkpoint(path)["wgan_counters"]["gen_step"]
            except Exception:  # being replaced right now; atomic writes make this a race on the name only
                step = -1
            if step >= min_step:
                return step
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint at step >= {min_step} in {path} after {timeout} s")


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_a_real_run(tmp_path, data):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    args = ["trainer=cpu", "trainer.max_epochs=-1", f"data.root={data}", "checkpoint_every_n_gen_steps=1",
            "logger.sample_every_n_gen_steps=5", *TINY_ARGS]

    # 1. SIGTERM: a checkpoint at a batch boundary, a clean exit, and the command that resumes.
    proc = subprocess.Popen([sys.executable, *TRAIN, *args, "max_gen_steps=100000", f"hydra.run.dir={run}"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(last, proc, min_step=2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-2000:]
    assert "Traceback" not in err
    stopped_at = read_checkpoint(last)["wgan_counters"]["gen_step"]
    assert f"Interrupted: saved {last} at generator step {stopped_at}" in err
    resume_cmd = shlex.split(re.search(r"Resume with:\n\s+(.+)", err).group(1))
    assert resume_cmd[:3] == ["python", "-m", "wgan_lit.train"] and f"ckpt_path={last}" in resume_cmd

    # 2. The printed command resumes; SIGKILL it at a random moment (checkpoints are written every step).
    proc = subprocess.Popen([sys.executable, *resume_cmd[1:]], cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(last, proc, min_step=stopped_at + 1)
    time.sleep(random.uniform(0.0, 1.0))
    proc.kill()
    proc.wait()

    # 3. What is on disk is a whole checkpoint, and the run goes on from it to the end.
    killed_at = read_checkpoint(last)["wgan_counters"]["gen_step"]
    assert killed_at > stopped_at
    run_cli([*TRAIN, *args, f"max_gen_steps={killed_at + 3}", f"ckpt_path={last}", f"hydra.run.dir={run}"],
            cwd=tmp_path)
    assert read_checkpoint(last)["wgan_counters"]["gen_step"] == killed_at + 3
    assert (run / "timelapse.gif").is_file()


# ---- DDP: two CPU processes through the command line ----------------------------------------------------

DDP = ["trainer=ddp_cpu", "trainer.deterministic=true", "seed=7", "logger.sample_every_n_gen_steps=0",
       "trainer.max_epochs=-1", *TINY_ARGS]
DDP_STEPS = 40  # 128 images / 2 ranks / batch 16 = 4 batches per rank and epoch = 2 generator steps


@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory, data) -> Path:
    run = tmp_path_factory.mktemp("ddp_straight")
    run_cli([str(PROBE), *DDP, f"data.root={data}", f"max_gen_steps={DDP_STEPS}", f"hydra.run.dir={run}"], cwd=run)
    return run


def assert_ddp_resume_is_exact(straight: Path, resumed: Path) -> None:
    """Each rank: the same final weights, and the batches of the parts are exactly those of the straight run."""
    for rank in (0, 1):
        (whole,) = probe_reports(straight, rank)
        parts = probe_reports(resumed, rank)
        assert len(parts) == 2 and parts[1]["start_gen_step"] > 0
        assert parts[1]["end"] == whole["end"]  # critic and generator, bit for bit
        assert [b for p in parts for b in p["batches"]] == whole["batches"]  # none twice, none skipped
        assert parts[1]["sampler"][2] == "DistributedSampler"
    noises = [probe_reports(resumed, rank)[1]["noise"] for rank in (0, 1)]
    assert noises[0] != noises[1]  # the per-rank noise streams came back, not one rank's on both


@pytest.mark.slow
def test_ddp_resume_after_max_gen_steps_is_exact_on_both_ranks(tmp_path, data, ddp_straight):
    common = [str(PROBE), *DDP, f"data.root={data}", f"hydra.run.dir={tmp_path}"]
    run_cli([*common, "max_gen_steps=13"], cwd=tmp_path)  # mid-epoch: 26 batches of 4-batch epochs
    run_cli([*common, f"max_gen_steps={DDP_STEPS}", f"ckpt_path={tmp_path}/checkpoints/last.ckpt"], cwd=tmp_path)
    assert_ddp_resume_is_exact(ddp_straight, tmp_path)
    (whole,) = probe_reports(ddp_straight, 0)
    assert whole["batches"] != probe_reports(ddp_straight, 1)[0]["batches"]  # control: ranks see other shards


@pytest.mark.slow
def test_ddp_resume_after_sigterm_is_exact_on_both_ranks(tmp_path, data, ddp_straight):
    common = [str(PROBE), *DDP, f"data.root={data}", f"hydra.run.dir={tmp_path}", f"max_gen_steps={DDP_STEPS}",
              "checkpoint_every_n_gen_steps=2"]
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, *common], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(last, proc, min_step=4)
    proc.send_signal(signal.SIGTERM)  # to rank 0 only: the ranks decide together to stop at one batch
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:] + err[-3000:]
    assert err.count("Interrupted: saved") == 1  # said once, by rank 0
    stopped_at = read_checkpoint(last)["wgan_counters"]["gen_step"]
    assert 4 <= stopped_at < DDP_STEPS
    run_cli([*common, f"ckpt_path={last}"], cwd=tmp_path)
    assert_ddp_resume_is_exact(ddp_straight, tmp_path)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_same_message(tmp_path, data):
    env = {**ENV, "PROBE_NAN_RANK": "1", "PROBE_NAN_AFTER": "6"}  # rank 1's 7th batch: generator step 4
    proc = subprocess.run([sys.executable, str(PROBE), *DDP, f"data.root={data}", f"hydra.run.dir={tmp_path}",
                           "max_gen_steps=20", "logger.log_every_n_gen_steps=5", "checkpoint_every_n_gen_steps=2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    # Caught at the checkpoint write due at step 4 on both ranks, none hangs. (DDP's all-reduce carries rank 1's
    # NaN gradient to rank 0 within the step; the decision across ranks is tested in tests/test_module.py.)
    assert proc.stderr.count("NaN or inf at generator step 4.") == 2, proc.stderr[-3000:]
    assert read_checkpoint(tmp_path / "checkpoints/last.ckpt")["wgan_counters"]["gen_step"] == 2  # kept


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory, data) -> Path:
    """``-m model.clip_value=0.01,0.02 trainer=ddp_cpu``: two jobs, each two processes; returns the launch dir."""
    tmp = tmp_path_factory.mktemp("ddp_sweep")
    run_cli([str(PROBE), "-m", "model.clip_value=0.01,0.02", "trainer=ddp_cpu", f"data.root={data}",
             "max_gen_steps=3", "logger.log_every_n_gen_steps=1", *TINY_ARGS], cwd=tmp)
    return tmp


@pytest.mark.slow
def test_ddp_sweep_writes_one_sweep_dir_with_one_subdir_per_job(ddp_sweep):
    sweeps = list((ddp_sweep / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps  # ranks > 0 start no sweep of their own
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir()) == ["0", "1"]
    assert not (ddp_sweep / "outputs").exists()
    for job in ("0", "1"):
        job_dir = sweeps[0] / job
        assert (job_dir / ".hydra").is_dir() and (job_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran here
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert len(list((job_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's only


@pytest.mark.slow
@pytest.mark.parametrize("job,clip", [("0", 0.01), ("1", 0.02)])
def test_ddp_ranks_hold_identical_clipped_parameters_and_draw_their_own_noise(ddp_sweep, job, clip):
    (sweep,) = (ddp_sweep / "multirun").glob("*/*")
    (r0,), (r1,) = probe_reports(sweep / job, 0), probe_reports(sweep / job, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["gen_step"] == r1["gen_step"] == 3 and r0["global_step"] == 3 * (2 + 1)  # critic + generator steps
    assert r0["end"] == r1["end"]  # critic and generator, bit for bit
    assert r0["noise"] != r1["noise"]  # each rank generates its own fakes
    assert r0["max_abs_critic"] <= clip + 1e-7 and r0["max_abs_critic"] > clip / 2  # clipped, to this job's c


@pytest.mark.slow
def test_each_sweep_job_logs_its_hyperparameters_and_final_metrics_to_the_hparams_view(ddp_sweep):
    (sweep,) = (ddp_sweep / "multirun").glob("*/*")
    for job, clip in (("0", 0.01), ("1", 0.02)):
        acc = EventAccumulator(str(sweep / job / "tensorboard"))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = session.session_start_info.hparams
        assert hparams["model/clip_value"].number_value == pytest.approx(clip)
        assert hparams["trainer/strategy"].string_value == "ddp_find_unused_parameters_true"
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        metrics = {m.name.tag for m in experiment.metric_infos}
        assert {"final/W", "final/g_loss", "final/gen_step"} <= metrics
        for tag in metrics:  # each metric has its value at the last generator step
            assert [e.step for e in acc.Scalars(tag)] == [3]
        assert acc.Scalars("final/W")[0].value == pytest.approx(acc.Scalars("critic/wasserstein")[-1].value)


@pytest.mark.slow
def test_single_ddp_run_uses_one_run_directory(tmp_path, data):
    proc = run_cli([*TRAIN, "trainer=ddp_cpu", f"data.root={data}", "max_gen_steps=2", *TINY_ARGS], cwd=tmp_path)
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # rank 1 wrote into rank 0's timestamped directory, not one of its own
    assert (runs[0] / "train_ddp_process_1.log").is_file()
    assert proc.stderr.count(f"Run directory: {runs[0]}") == 2  # both ranks report the same directory
    assert proc.stderr.count("- Training:\n  device      cpu x 2 process(es)") == 1  # the summary, by rank 0


# ---- Hydra and Lightning's DDP launcher -------------------------------------------------------------------


def test_under_multirun_ddp_ranks_rerun_only_this_job_in_its_directory(tmp_path, monkeypatch):
    cfg = compose_train(["model.clip_value=0.02", "trainer=ddp_cpu"], hydra=True)
    job_dir = tmp_path / "multirun" / "sweep" / "1"
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(job_dir)
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.overrides.task = ["model.clip_value=0.02", "trainer=ddp_cpu"]
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model.clip_value=0.01,0.02", "trainer=ddp_cpu"])
    HydraConfig.instance().set_config(cfg)
    try:
        with ddp_job():
            command, _ = _hydra_subprocess_cmd(local_rank=1)  # what Lightning will run for rank 1
    finally:
        HydraConfig.instance().cfg = None
    args = command[3:]  # after python -m <main module>
    assert args[:2] == ["model.clip_value=0.02", "trainer=ddp_cpu"]  # this job's values, not the sweep's lists
    assert "-m" not in args and "--multirun" not in args
    assert f'hydra.run.dir="{job_dir}"' in args


def test_a_ddp_job_leaves_no_process_group_or_launcher_variables_for_the_next(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with ddp_job():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
    assert not dist.is_initialized()
    assert "MASTER_PORT" not in os.environ and "LOCAL_RANK" not in os.environ


def test_train_applies_cpu_threads(tmp_path, data, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    cfg = tiny_config(data, 1)
    cfg.cpu_threads = 1
    train(cfg, tmp_path)
    assert seen == [1]
    seen.clear()
    train(tiny_config(data, 1), tmp_path / "control")  # control: 0 leaves torch's default alone
    assert seen == []
