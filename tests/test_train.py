"""A real run through the command line: TensorBoard scalars and images, sample PNGs, checkpoints that reload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, write_fake_fashion_mnist
from wgan_lit.module import WGAN

TINY_ARGS = ["trainer=cpu", "trainer.enable_progress_bar=false", "model.g_features=8", "model.d_features=8",
             "model.latent_dim=16", "model.n_fixed_samples=9", "data.batch_size=16"]


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "wgan_lit.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("cli")
    data = write_fake_fashion_mnist(tmp / "data", n_train=256)
    run_dir = tmp / "run"
    proc = run_cli([f"data.root={data}", f"hydra.run.dir={run_dir}", "model.n_critic=2", "max_gen_steps=6",
                    "logger.log_every_n_gen_steps=2", "logger.sample_every_n_gen_steps=3", *TINY_ARGS], cwd=tmp)
    return run_dir, proc


@pytest.mark.slow
def test_run_prints_the_resolved_config(finished_run):
    _, proc = finished_run
    assert "clip_value: 0.01" in proc.stdout and "n_critic: 2" in proc.stdout


@pytest.mark.slow
def test_run_writes_tensorboard_scalars_on_generator_steps_and_sample_images(finished_run):
    run_dir, _ = finished_run
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, f"no event file under {run_dir}"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("critic/loss", "critic/wasserstein", "generator/loss"):
        assert tag in tags["scalars"], tags
        assert [e.step for e in acc.Scalars(tag)] == [2, 4, 6]  # x axis = generator steps
    for loss, w in zip(acc.Scalars("critic/loss"), acc.Scalars("critic/wasserstein"), strict=True):
        assert w.value == pytest.approx(-loss.value)
    assert "samples" in tags["images"]
    assert [e.step for e in acc.Images("samples")] == [0, 3, 6]
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [
        "gen_000000.png", "gen_000003.png", "gen_000006.png"]


@pytest.mark.slow
def test_run_stops_at_max_gen_steps_and_its_checkpoint_reloads_without_hydra(finished_run):
    run_dir, _ = finished_run
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert list((run_dir / "checkpoints").glob("epoch000-gen6.ckpt"))
    model = WGAN.load_from_checkpoint(last, map_location="cpu")
    assert model.gen_step == 6
    images = model.sample(5, seed=0)
    assert images.shape == (5, 1, 28, 28) and images.device.type == "cpu"
    assert images.min() >= -1 and images.max() <= 1
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["clip_value"] == 0.01 and ckpt["wgan_counters"]["gen_step"] == 6


@pytest.mark.slow
def test_missing_data_is_one_clear_error_before_training(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", "import wgan_lit.data as d, sys; d.SYSTEM_DIRS.clear(); sys.argv[1:] = "
         f"['data.root={tmp_path}/none', 'hydra.run.dir={tmp_path}/run']; from wgan_lit.train import main; main()"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Fashion-MNIST not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "checkpoints").exists()
