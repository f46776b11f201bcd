"""Interrupt safety and the divergence guard: atomic writes, Ctrl-C/SIGTERM, SIGKILL, NaN losses."""

from __future__ import annotations

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

import wgan_lit.data as data_mod
from tests.conftest import REPO, write_fake_fashion_mnist
from tests.test_resume import load, tiny_config
from wgan_lit.checkpointing import atomic_torch_save, read_checkpoint
from wgan_lit.module import DivergenceError
from wgan_lit.train import train

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while writing")


def test_a_write_that_fails_halfway_leaves_the_old_checkpoint_intact(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1, "w": torch.ones(1000)}, target)
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"step": 2, "w": torch.zeros(1000), "bad": Unpicklable()}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file is cleaned up


WRITER = """
import sys, torch
from wgan_lit.checkpointing import atomic_torch_save
payload = torch.arange(6_000_000, dtype=torch.float32)  # 24 MB: most of the loop's time is spent writing
i = 0
while True:
    i += 1
    atomic_torch_save({"i": i, "w": payload + i}, sys.argv[1])
    print(i, flush=True)
"""


@pytest.mark.slow
def test_sigkill_while_writing_never_leaves_a_truncated_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=ENV, stdout=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(3):  # several writes done, then a kill at a random moment of the write loop
            proc.stdout.readline()
        time.sleep(random.uniform(0.0, 0.3))
    finally:
        proc.kill()
        proc.wait()
    ckpt = torch.load(target, weights_only=True)  # a truncated file would raise here
    assert ckpt["i"] >= 3 and torch.equal(ckpt["w"], torch.arange(6_000_000, dtype=torch.float32) + ckpt["i"])


# ---- divergence --------------------------------------------------------------------------------


def nan_after(n_batches: int):
    """A stand-in for data.to_unit_range whose batches turn to NaN from batch ``n_batches`` on."""
    real, calls = data_mod.to_unit_range, [0]

    def to_unit_range(batch):
        calls[0] += 1
        out = real(batch)
        return out.fill_(float("nan")) if calls[0] > n_batches else out

    return to_unit_range


@pytest.mark.parametrize("log_every", [1, 100], ids=["caught-at-a-log-point", "caught-at-a-checkpoint-write"])
def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, log_every):
    data = write_fake_fashion_mnist(tmp_path / "data", n_train=128)
    # n_critic=2: batches 0-1 -> generator step 1, 2-3 -> 2, 4-5 -> 3, 6-7 -> 4. Batch 6 is NaN: step 4.
    monkeypatch.setattr(data_mod, "to_unit_range", nan_after(6))
    cfg = tiny_config(data, 8)
    cfg.logger.log_every_n_gen_steps = log_every
    cfg.checkpoint_every_n_gen_steps = 1  # a write is due right after the bad step: it must not happen
    with pytest.raises(DivergenceError) as err:
        train(cfg, tmp_path / "run")
    assert err.value.gen_step == 4 and "NaN or inf at generator step 4" in str(err.value)
    last = load(tmp_path / "run/checkpoints/last.ckpt")
    assert last["wgan_counters"]["gen_step"] == 3  # the last good one, not overwritten
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


# ---- Ctrl-C, SIGTERM and SIGKILL on real runs --------------------------------------------------


def test_ctrl_c_saves_at_the_batch_boundary_and_resuming_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    from tests.test_resume import N, assert_same_training_state, curves
    from wgan_lit.module import WGAN

    data = write_fake_fashion_mnist(tmp_path / "data", n_train=128)
    train(tiny_config(data, N), tmp_path / "straight")

    real_step = WGAN.training_step

    def step_then_ctrl_c(self, batch, batch_idx):
        if self.gen_step == 2 and self.critic_step_in_iter == 1:  # the batch that completes generator step 3
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step: the step must still finish
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(WGAN, "training_step", step_then_ctrl_c)
    with pytest.raises(SystemExit) as stop:
        train(tiny_config(data, N), tmp_path / "run")
    assert stop.value.code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our handler is gone again
    last = tmp_path / "run/checkpoints/last.ckpt"
    assert load(last)["wgan_counters"] == {"gen_step": 3, "critic_step_in_iter": 0}

    monkeypatch.setattr(WGAN, "training_step", real_step)
    train(tiny_config(data, N, ckpt_path=str(last)), tmp_path / "run")
    assert_same_training_state(load(tmp_path / "straight/checkpoints/last.ckpt"), load(last))
    assert curves(tmp_path / "straight") == curves(tmp_path / "run")


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
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step >= {min_step} in {path} after {timeout} s")


@pytest.mark.slow
def test_sigterm_then_sigkill_then_resume_a_real_run(tmp_path):
    data = write_fake_fashion_mnist(tmp_path / "data", n_train=256)
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"
    args = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=-1", "model.g_features=8",
            "model.d_features=8", "model.latent_dim=16", "model.n_fixed_samples=4", "model.n_critic=2",
            "data.batch_size=16", f"data.root={data}", "checkpoint_every_n_gen_steps=1",
            "logger.sample_every_n_gen_steps=5"]
    cmd = [sys.executable, "-m", "wgan_lit.train"]

    # 1. SIGTERM: a checkpoint at a batch boundary, a clean exit, and the command that resumes.
    proc = subprocess.Popen([*cmd, *args, "max_gen_steps=100000", f"hydra.run.dir={run}"], cwd=tmp_path,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    done = subprocess.run([*cmd, *args, f"max_gen_steps={killed_at + 3}", f"ckpt_path={last}",
                           f"hydra.run.dir={run}"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert read_checkpoint(last)["wgan_counters"]["gen_step"] == killed_at + 3
    assert (run / "timelapse.gif").is_file()
