"""DDP on two CPU processes: which images each rank is served, and a run that loses one of its processes."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from omegaconf import open_dict
from torch.utils.data import DistributedSampler

import wgan_lit.train as train_mod
from tests.conftest import ENV, PROBE, TINY_ARGS, compose_train, probe_reports, run_cli, write_fake_fashion_mnist
from wgan_lit.checkpointing import read_checkpoint
from wgan_lit.train import LostProcessReport, lost_process_reason

N_IMAGES, WORLD, BATCH, SEED = 127, 2, 16, 7  # 127: the ranks' shares of a pass are unequal before the drop
DDP = ["trainer=ddp_cpu", f"seed={SEED}", "logger.sample_every_n_gen_steps=0", *TINY_ARGS]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fmnist", n_train=N_IMAGES)


# ---- the data each rank is served ---------------------------------------------------------------------------


@pytest.mark.slow
def test_in_one_pass_the_ranks_are_served_disjoint_indices_that_cover_the_pass_once(tmp_path, data):
    """The pass of epoch e: DistributedSampler(shuffle, seed, drop_last=True) takes the first WORLD * (N // WORLD)
    places of the epoch's permutation of the N images (randperm seeded by seed + e) and deals them out in turn,
    rank r taking places r, r + WORLD, ...; each rank's loader serves its full batches only (drop_last=True).
    Here 127 images: 63 places per rank, 3 batches of 16 each, so the pass is 2 x 48 = 96 images."""
    run_cli([str(PROBE), *DDP, "trainer.max_epochs=1", f"data.root={data}", f"hydra.run.dir={tmp_path}"],
            cwd=tmp_path)
    reports = [probe_reports(tmp_path, rank)[0] for rank in range(WORLD)]
    for report in reports:  # every batch it trained on was noted, and nothing else was fetched
        assert len(report["indices"]) == len(report["batches"]) and {len(b) for b in report["indices"]} == {BATCH}
    served = [[i for batch in report["indices"] for i in batch] for report in reports]
    assert not set(served[0]) & set(served[1])  # disjoint
    both = served[0] + served[1]
    assert len(set(both)) == len(both)  # no image twice
    the_pass = [list(DistributedSampler(range(N_IMAGES), num_replicas=WORLD, rank=r, shuffle=True, seed=SEED,
                                        drop_last=True))[:3 * BATCH] for r in range(WORLD)]
    assert len(both) == WORLD * 3 * BATCH and sorted(both) == sorted(the_pass[0] + the_pass[1])  # the pass, whole
    assert served == the_pass  # each rank its own share, in the sampler's order


# ---- a process of the run that dies -------------------------------------------------------------------------

# What gloo raised in a collective on rank 0 once rank 1 was killed with kill -9 (torch 2.14): in the DDP
# all-reduce of a backward, a barrier, all_gather_object, all_reduce; and before the first collective.
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
              "[127.0.0.1]:28040: Connection reset by peer. This is typically caused by a remote worker hanging "
              "or bugs in the application. Check the logs of the remote worker before reporting an error. GLHF!")
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
               "[127.0.0.1]:26266. This is typically caused by a remote worker crashing. Check the logs of the "
               "remote worker before reporting an error. GLHF!")


def test_the_errors_of_a_dead_peer_are_recognised_and_nothing_else():
    assert lost_process_reason(RuntimeError(GLOO_RESET)) == "torch.distributed: connection reset by peer"
    assert lost_process_reason(RuntimeError(GLOO_CLOSED)) == "torch.distributed: connection closed by peer"
    assert lost_process_reason(torch.distributed.DistBackendError(GLOO_RESET)) is not None  # a RuntimeError too
    for other in (RuntimeError("CUDA out of memory"), ConnectionResetError("Connection reset by peer"),
                  ValueError(GLOO_RESET)):  # a socket of Python's own, not torch.distributed's error
        assert lost_process_reason(other) is None


@pytest.fixture
def hydra_run(tmp_path):
    """A run's config as Hydra hands it to ``_main``, with its HydraConfig set; yields (cfg, run dir)."""
    overrides = ["trainer=ddp_cpu", "max_gen_steps=50"]
    hydra_cfg = compose_train(overrides, hydra=True)
    with open_dict(hydra_cfg):
        hydra_cfg.hydra.runtime.output_dir = str(tmp_path)
        hydra_cfg.hydra.overrides.task = overrides
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        yield compose_train(overrides), tmp_path
    finally:
        HydraConfig.instance().cfg = None


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def launcher_log():
    """Lightning's launcher logger with a handler that notes what passes its filters."""
    logger, lines = logging.getLogger(LostProcessReport.LAUNCHER_LOG), Lines()
    logger.addHandler(lines)
    try:
        yield logger, lines.lines
    finally:
        logger.removeHandler(lines)
        logger.filters.clear()


def save_fake_last(run_dir: Path, gen_step: int) -> Path:
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"wgan_counters": {"gen_step": gen_step}}, last)
    return last


def expected_resume(run_dir: Path, last: Path) -> str:
    return (f"python -m wgan_lit.train trainer=ddp_cpu max_gen_steps=50 ckpt_path={last} "
            f"hydra.run.dir={run_dir}")


def fails_with(error: BaseException):
    def train(cfg, run_dir, extra_callbacks=()):
        save_fake_last(Path(run_dir), 6)
        raise error
    return train


def test_main_says_a_dead_peer_in_one_message_with_the_resume_command(hydra_run, launcher_log, monkeypatch,
                                                                      caplog):
    cfg, run_dir = hydra_run
    monkeypatch.setattr(train_mod, "_log_to_the_run", lambda: None)  # Hydra's logging is not set up here
    monkeypatch.setattr(train_mod, "train", fails_with(RuntimeError(GLOO_RESET)))
    with pytest.raises(SystemExit) as stop:
        train_mod._main(cfg)
    assert stop.value.code == 1
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.getMessage() == (
        "Error: a process of this distributed run died (torch.distributed: connection reset by peer); the run "
        f"stopped.\nLast checkpoint: {run_dir}/checkpoints/last.ckpt (generator step 6). Resume with:\n  "
        + expected_resume(run_dir, run_dir / "checkpoints" / "last.ckpt"))
    # Left in place once said: the launcher's line of the same death, coming after, stays out.
    assert [type(f) for f in launcher_log[0].filters] == [LostProcessReport]


def test_main_lets_other_runtime_errors_through(hydra_run, monkeypatch, caplog):
    cfg, _ = hydra_run
    monkeypatch.setattr(train_mod, "_log_to_the_run", lambda: None)
    monkeypatch.setattr(train_mod, "train", fails_with(RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        train_mod._main(cfg)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not logging.getLogger(LostProcessReport.LAUNCHER_LOG).filters  # removed: the next job adds its own


def observe_once(child: subprocess.Popen) -> subprocess.Popen:
    """One poll of Lightning's own observer of a DDP launch; what it kills as 'the main process' is a stand-in."""
    child.wait()
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    _ChildProcessObserver(main_pid=stand_in.pid, child_processes=[child])._run()
    stand_in.wait(timeout=30)
    return stand_in


def test_the_launcher_killing_rank_0_for_a_killed_child_waits_for_the_message(hydra_run, launcher_log, caplog):
    _, run_dir = hydra_run
    last = save_fake_last(run_dir, 4)
    logger, passed = launcher_log
    lost = LostProcessReport(run_dir)
    logger.addFilter(lost)
    child = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert observe_once(child).returncode == -signal.SIGKILL  # Lightning kills rank 0 right after its log line
    said = [r.getMessage() for r in caplog.records if r.name == "wgan_lit.train"]
    assert said == ["Error: a process of this distributed run died (a child process was killed by signal 9); the "
                    f"run stopped.\nLast checkpoint: {last} (generator step 4). Resume with:\n  "
                    + expected_resume(run_dir, last)]
    assert passed == []  # Lightning's own line of it is left out: one message
    lost.say("torch.distributed: connection reset by peer")  # the collective's error, reaching _main after
    assert len([r for r in caplog.records if r.name == "wgan_lit.train"]) == 1


def test_a_child_that_failed_and_said_so_gets_no_message_of_ours(hydra_run, launcher_log, caplog):
    _, run_dir = hydra_run
    logger, passed = launcher_log
    logger.addFilter(LostProcessReport(run_dir))
    observe_once(subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"]))
    assert not [r for r in caplog.records if r.name == "wgan_lit.train"]
    assert len(passed) == 1 and "terminated with code 1" in passed[0]  # control: the launcher's line itself


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def rank_1_of(proc: subprocess.Popen, timeout: float = 30) -> int:
    """The pid of the rank-1 process Lightning started from ``proc`` (rank 0): its command names the job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in children(proc.pid):
            if b"hydra.job.name=train_ddp_process_1" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        time.sleep(0.1)
    raise AssertionError("no rank 1 process")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds rank 1 through Linux's /proc")
def test_a_rank_killed_mid_run_stops_rank_0_with_the_resume_command_which_resumes(tmp_path, data):
    last, log = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "console.txt"
    with log.open("w") as console:  # a file, not a pipe nobody reads while the run goes on
        proc = subprocess.Popen([sys.executable, "-m", "wgan_lit.train", *DDP, f"data.root={data}",
                                 "max_gen_steps=100000", "trainer.max_epochs=-1", "checkpoint_every_n_gen_steps=2",
                                 f"hydra.run.dir={tmp_path}"], cwd=tmp_path, env=ENV, stdout=console, stderr=console)
    rank_1 = killed = None
    try:
        rank_1 = rank_1_of(proc, timeout=120)
        deadline = time.monotonic() + 120
        while not last.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last.is_file(), log.read_text()[-3000:]
        os.kill(rank_1, signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=60)
    finally:  # on a failure, end what this test started
        if proc.poll() is None:
            proc.kill()
        if rank_1 is not None and killed is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(rank_1, signal.SIGKILL)
    output = log.read_text()
    assert proc.returncode != 0 and time.monotonic() - killed < 30, (proc.returncode, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    assert output.count("Error: a process of this distributed run died") == 1, output[-3000:]
    lines = output.splitlines()
    resume = lines[next(i for i, line in enumerate(lines) if line.endswith("Resume with:")) + 1].strip()
    step = read_checkpoint(last)["wgan_counters"]["gen_step"]
    assert f"Last checkpoint: {last} (generator step {step}). Resume with:" in output
    # The printed command, as a user runs it, to 2 generator steps past the checkpoint.
    argv = [sys.executable if a == "python" else f"max_gen_steps={step + 2}" if a.startswith("max_gen_steps=") else a
            for a in shlex.split(resume)]
    assert argv[1:3] == ["-m", "wgan_lit.train"] and f"ckpt_path={last}" in argv
    proc = run_cli(argv[1:], cwd=tmp_path)
    assert read_checkpoint(last)["wgan_counters"]["gen_step"] == step + 2
    assert f"resumed at  generator step {step}" in proc.stderr
