"""DDP on two CPU processes (gloo): a sweep, one run's life (SIGTERM, a killed rank, a NaN), a lost process."""

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver, _hydra_subprocess_cmd
from omegaconf import open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import wgan_lit.train as train_mod
from tests.conftest import ENV, PROBE, TINY_ARGS, compose_train, probe_reports, write_fake_fashion_mnist
from wgan_lit.checkpointing import read_checkpoint
from wgan_lit.train import LostProcessReport, ddp_job

# 127 images: the ranks' shares are unequal before the drop; 63 places per rank = 3 batches of 16 per pass, so
# STEPS generator steps (n_critic=2) = 48 batches = 16 whole passes.
N_IMAGES, WORLD, BATCH, SEED, STEPS = 127, 2, 16, 7, 24
DDP = ["trainer=ddp_cpu", "trainer.max_epochs=-1", f"seed={SEED}", "trainer.deterministic=true", *TINY_ARGS,
       "logger.sample_every_n_gen_steps=0", "logger.log_every_n_gen_steps=1", "checkpoint_every_n_gen_steps=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fmnist", n_train=N_IMAGES)


def part(args: list[str], cwd: Path, event: str) -> subprocess.CompletedProcess:  # one that hangs fails the test
    return subprocess.run([sys.executable, *args], cwd=cwd, env={**ENV, "PROBE_EVENT": event}, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data) -> tuple[Path, subprocess.CompletedProcess]:
    """``-m max_gen_steps=24,28 trainer=ddp_cpu``: two jobs of two processes, the same training to step 24. The
    second is interrupted: a SIGTERM to its rank 0 alone as its 5th batch starts. (The sweep dir, the process.)"""
    tmp = tmp_path_factory.mktemp("sweep")
    proc = part([str(PROBE), "-m", f"max_gen_steps={STEPS},{STEPS + 4}", *DDP, f"data.root={data}"], tmp,
                f"0:SIGTERM:5:max_gen_steps={STEPS + 4}")
    (sweep_dir,) = (tmp / "multirun").glob("*/*")  # ranks > 0 start no sweep of their own
    assert not (tmp / "outputs").exists() and sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == ["0", "1"]
    return sweep_dir, proc


@pytest.mark.slow
def test_each_job_of_a_ddp_sweep_trains_on_both_ranks_in_its_own_dir_on_disjoint_shards_and_logs_its_hparams(sweep):
    sweep_dir, proc = sweep
    for job, steps in (("0", STEPS), ("1", STEPS + 4)):
        assert (sweep_dir / job / ".hydra").is_dir()  # rank 1 ran here, this job alone, with its own values:
        assert f"\nmax_gen_steps: {steps}\n" in (sweep_dir / job / "train_ddp_process_1.log").read_text()
    job_dir = sweep_dir / "0"
    assert (job_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(list((job_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's only
    assert proc.stderr.count(f"Run directory: {job_dir}\n") == 2  # both ranks, one directory
    (r0,), (r1,) = probe_reports(job_dir, 0), probe_reports(job_dir, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["gen_step"] == r1["gen_step"] == STEPS and r0["global_step"] == STEPS * (2 + 1)  # critic + generator
    assert r0["weights"] == r1["weights"] and len(r0["weights"]) == STEPS  # bit for bit, after every step
    assert r0["noise"] != r1["noise"]  # each rank generates its own fakes
    assert 0.01 / 2 < r0["max_abs_critic"] <= 0.01 + 1e-7  # clipped, to c
    (acc := EventAccumulator(str(job_dir / "tensorboard"))).Reload()
    pb, content = plugin_data_pb2.HParamsPluginData.FromString, acc.PluginTagToContent("hparams")
    hparams = pb(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["max_gen_steps"].number_value == STEPS and hparams["model/clip_value"].number_value == 0.01
    assert hparams["trainer/strategy"].string_value == "ddp_find_unused_parameters_true"
    metrics = {m.name.tag for m in pb(content["_hparams_/experiment"]).experiment.metric_infos}
    assert {"final/W", "final/g_loss", "final/gen_step"} <= metrics
    assert all([e.step for e in acc.Scalars(tag)] == [STEPS] for tag in metrics)  # at the last generator step
    assert acc.Scalars("final/W")[0].value == pytest.approx(acc.Scalars("critic/wasserstein")[-1].value)
    assert proc.stderr.count("- Training:\n  device      cpu x 2 process(es)") == 2  # the summary: rank 0, each job
    assert "clip_value: 0.01" in proc.stderr and "GPU available:" in proc.stderr  # the config, Lightning's lines

    # The pass of epoch e: DistributedSampler(shuffle, seed, drop_last=True) takes the first WORLD * (N // WORLD)
    # places of the permutation seeded by seed + e and deals them out in turn, rank r taking places r, r + WORLD, ...;
    # each rank's loader serves its full batches only: 3 of 16 here, so a pass is 2 x 48 of the 127 images.
    for r in (r0, r1):  # every batch it trained on was noted, and nothing else was fetched
        assert len(r["indices"]) == len(r["batches"]) == 2 * STEPS and {len(b) for b in r["indices"]} == {BATCH}
    for epoch in range(2 * STEPS // 3):
        served = [sum(r["indices"][3 * epoch:3 * epoch + 3], []) for r in (r0, r1)]
        assert not set(served[0]) & set(served[1]) and len(set(served[0] + served[1])) == WORLD * 3 * BATCH
        places = torch.randperm(N_IMAGES, generator=torch.Generator().manual_seed(SEED + epoch))[:2 * (N_IMAGES // 2)]
        assert served == [places[r::WORLD][:3 * BATCH].tolist() for r in range(WORLD)]  # each its share, in order


def resume_command(console: str) -> list[str]:  # the one printed, for the probe instead of python -m wgan_lit.train
    line = shlex.split(re.search(r"Resume with:\n\s+(.+)", console).group(1))
    assert line[:3] == ["python", "-m", "wgan_lit.train"], line
    return [str(PROBE), *line[3:]]


@pytest.mark.slow
def test_a_ddp_run_stopped_by_sigterm_then_a_killed_rank_then_a_nan_resumes_exactly_each_time(tmp_path, sweep):
    # 1. The sweep's interrupted job: its ranks stopped together after that batch (generator step 2 and a critic
    # step), saved, and the sweep ended with the command that resumes the job, as a single run.
    sweep_dir, proc = sweep
    job, last = sweep_dir / "1", sweep_dir / "1" / "checkpoints" / "last.ckpt"
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("Interrupted: saved") == 1 and read_checkpoint(last)["global_step"] == 7
    assert f"Interrupted: saved {last} at generator step 2" in proc.stderr
    command = resume_command(proc.stderr)
    assert {f"ckpt_path={last}", f"hydra.run.dir={job}", f"max_gen_steps={STEPS + 4}"} <= set(command) and (
        "-m" not in command)

    # 2. Resumed without hydra.run.dir: one timestamped run directory, rank 1's too. Rank 1 is SIGKILLed as its 4th
    # batch (the 9th) starts: rank 0, at its last checkpoint (generator step 4, batch 8), stops with one message.
    proc = part([a for a in command if not a.startswith("hydra.run.dir=")], tmp_path, "1:SIGKILL:4")
    (run_dir,) = tmp_path.glob("outputs/*/*")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (run_dir / "train_ddp_process_1.log").is_file()
    assert proc.stderr.count("Error: a process of this distributed run died") == 1, proc.stderr[-3000:]
    assert f"Last checkpoint: {last} (generator step 4). Resume with:" in proc.stderr

    # 3. The printed command, to the job's STEPS + 4: rank 1's batches turn NaN after the first job's last; both
    # ranks stop at that step, and the last good checkpoint stays.
    proc = part(resume_command(proc.stderr), tmp_path, f"1:NaN:{2 * STEPS - 8 + 1}")
    assert proc.returncode == 1 and "resumed at  generator step 4" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count(f"NaN or inf at generator step {STEPS + 1}.") == 2, proc.stderr[-3000:]
    assert read_checkpoint(last)["wgan_counters"]["gen_step"] == STEPS  # the write due at STEPS + 2 was refused

    # Each part of each rank trained on the first job's batches from where its checkpoint was, to its weights.
    for rank in range(WORLD):
        (whole,) = probe_reports(sweep_dir / "0", rank)
        parts = probe_reports(job, rank) + probe_reports(run_dir, rank)  # part 2's rank 1 was killed
        assert [(p["start_gen_step"], p["start_batch"]) for p in (parts[0], parts[-1])] == [(0, 0), (4, 8)]
        assert len(parts[0]["batches"]) == 5 and parts[-1]["sampler"] == "DistributedSampler"
        for p in parts:
            b, n = p["start_batch"], min(len(p["batches"]), len(whole["batches"]) - p["start_batch"])
            assert n > 0 and p["batches"][:n] == whole["batches"][b:b + n]  # the same images, in the same order
            assert all(w == whole["weights"][step] for step, w in p["weights"].items() if int(step) <= STEPS)
        assert len(parts[-1]["weights"]) == STEPS - 4
    assert probe_reports(run_dir, 0)[-1]["noise"] != probe_reports(run_dir, 1)[-1]["noise"]  # per-rank streams back


TASK = ["trainer=ddp_cpu", "max_gen_steps=50"]


@pytest.fixture
def hydra_job(tmp_path, monkeypatch, caplog):
    """A job as Hydra hands it to ``_main`` (HydraConfig by ``job(mode, task)``, TASK until called), last.ckpt at step 4
    and Lightning's launcher log noting what passes its filters: (job, run dir, launcher log, passed, our messages)."""
    monkeypatch.setattr(train_mod, "_log_to_the_run", lambda: None)  # Hydra's logging is not set up here

    def job(mode: RunMode, task: list[str]) -> None:
        hydra_cfg = compose_train(task, hydra=True)
        with open_dict(hydra_cfg):
            hydra_cfg.hydra.mode, hydra_cfg.hydra.overrides.task = mode, task
            hydra_cfg.hydra.runtime.output_dir, hydra_cfg.hydra.runtime.cwd = str(tmp_path), str(tmp_path.parent)
        HydraConfig.instance().set_config(hydra_cfg)

    job(RunMode.RUN, TASK)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"wgan_counters": {"gen_step": 4}}, tmp_path / "checkpoints" / "last.ckpt")
    logger, passed, handler = logging.getLogger(LostProcessReport.LAUNCHER_LOG), [], logging.Handler()
    handler.emit = lambda record: passed.append(record.getMessage())
    logger.addHandler(handler)
    yield job, tmp_path, logger, passed, lambda: [r.getMessage() for r in caplog.records if r.name == "wgan_lit.train"]
    logger.removeHandler(handler)
    logger.filters.clear()
    HydraConfig.instance().cfg = None


def lost(run_dir: Path, reason: str) -> str:  # our message of a lost process, its checkpoint and resume command
    last = run_dir / "checkpoints" / "last.ckpt"
    return (f"Error: a process of this distributed run died ({reason}); the run stopped.\nLast checkpoint: {last} "
            f"(generator step 4). Resume with:\n  python -m wgan_lit.train {' '.join(TASK)} ckpt_path={last} "
            f"hydra.run.dir={run_dir}")


def test_under_multirun_a_ddp_job_has_its_ranks_rerun_it_alone_and_leaves_nothing_for_the_next(hydra_job, monkeypatch):
    job, job_dir, *_ = hydra_job
    job(RunMode.MULTIRUN, ["model.clip_value=0.02", "trainer=ddp_cpu"])
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model.clip_value=0.01,0.02", "trainer=ddp_cpu"])
    before = dict(os.environ)
    with ddp_job():
        args = _hydra_subprocess_cmd(local_rank=1)[0][3:]  # what Lightning will run for rank 1, after python -m X
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
    assert args[:2] == ["model.clip_value=0.02", "trainer=ddp_cpu"]  # this job's values, not the sweep's lists
    assert "-m" not in args and "--multirun" not in args and f'hydra.run.dir="{job_dir}"' in args
    assert not dist.is_initialized() and dict(os.environ) == before  # no launcher variables (MASTER_PORT, ...) left


# What gloo raised in a collective on rank 0 once rank 1 was killed with kill -9 (torch 2.14): in the DDP
# all-reduce of a backward, a barrier, all_gather_object, all_reduce; and before the first collective.
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:28040: "
              "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the code.")
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
               "[127.0.0.1]:26266. This is typically caused by a remote worker crashing.")


@pytest.mark.parametrize("error,reason", [
    (RuntimeError(GLOO_RESET), "connection reset by peer"), (RuntimeError(GLOO_CLOSED), "connection closed by peer"),
    (dist.DistBackendError(GLOO_RESET), "connection reset by peer"),  # a RuntimeError too
    (RuntimeError("CUDA out of memory"), None), (ValueError(GLOO_RESET), None),  # not torch.distributed's error,
    (ConnectionResetError("Connection reset by peer"), None)])  # nor a socket of Python's own
def test_main_says_a_dead_peer_in_one_message_and_lets_other_errors_through(hydra_job, monkeypatch, error, reason):
    _, run_dir, logger, _, ours = hydra_job
    def fails(*_, **__):
        raise error

    monkeypatch.setattr(train_mod, "train", fails)
    with pytest.raises(SystemExit if reason else type(error)) as stop:
        train_mod._main(compose_train(TASK))
    if reason:  # left in place once said: the launcher's line of the same death, after, stays out
        assert stop.value.code == 1 and ours() == [lost(run_dir, f"torch.distributed: {reason}")]
        assert [type(f) for f in logger.filters] == [LostProcessReport]
    else:  # through, and the filter removed: the next job adds its own
        assert stop.value is error and ours() == [] and logger.filters == []


@pytest.mark.parametrize("dies", ["killed", "failed"])
def test_the_launcher_killing_rank_0_for_a_killed_child_waits_for_our_message_of_it(hydra_job, dies):
    _, run_dir, logger, passed, ours = hydra_job
    logger.addFilter(report := LostProcessReport(run_dir))
    code = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)" if dies == "killed" else "raise SystemExit(1)"
    (child := subprocess.Popen([sys.executable, "-c", code])).wait()
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # as 'the main process'
    _ChildProcessObserver(main_pid=stand_in.pid, child_processes=[child])._run()  # one poll of Lightning's observer
    assert stand_in.wait(timeout=30) == -signal.SIGKILL  # it kills the main process right after its line
    if dies == "failed":  # a child that failed said so itself: the launcher's own line, nothing of ours
        assert ours() == [] and len(passed) == 1 and "terminated with code 1" in passed[0]
        return
    assert ours() == [lost(run_dir, "a child process was killed by signal 9")] and passed == []  # one message
    report.say("torch.distributed: connection reset by peer")  # the collective's error, reaching _main after
    assert len(ours()) == 1
