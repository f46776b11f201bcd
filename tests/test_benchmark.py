"""benchmarks/throughput.py --quick --probe runs end to end and prints every line it promises (no timing checks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SYSTEM_FMNIST = "/usr/share/datasets/fashion-mnist"
RATE = re.compile(r"^rate\[(?P<name>[^\]]+)\]: (?P<rate>[\d.]+) gen_iter/s  ratio_vs_plain: (?P<ratio>[\d.]+)  "
                  r"flop_efficiency: (?P<eff>[\d.]+)%  rounds: [\d. ]+$", re.M)


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.skipif(not os.path.isdir(SYSTEM_FMNIST), reason=f"needs the real Fashion-MNIST in {SYSTEM_FMNIST}")
def test_quick_benchmark_prints_rates_ratios_and_flop_efficiency(tmp_path):
    variants = ["lightning", "lightning per-item loader", "lightning python clamp", "lightning NCHW"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--quick", "--threads", "1",
         "--features", "8", "--latent-dim", "16", "--probe", "--variants", *variants],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^device: cpu  torch \S+  lightning \S+  threads 1$", out, re.M), out
    assert re.search(r"^flops_per_gen_iter: [\d.]+ GFLOP  matmul_peak: [\d.]+ GFLOP/s$", out, re.M), out
    chosen = re.search(r"^probe: (fast_path choice \((32-true|bf16-mixed), [^)]+\))$", out, re.M)
    assert chosen, out  # the probe's pick, timed next to the fixed settings
    rows = {m["name"]: m for m in RATE.finditer(out)}
    assert list(rows) == ["plain", f"lightning {chosen[1]}", *variants], out
    assert float(rows["plain"]["ratio"]) == 1.0
    assert all(float(r["rate"]) > 0 and float(r["eff"]) > 0 for r in rows.values())
    assert list(tmp_path.iterdir()) == [], "the benchmark must clean up after itself"


@pytest.fixture(scope="module")
def scored_runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny runs that scored themselves every 2 generator steps, one with an averaged generator."""
    from tests.conftest import tiny_classifier, tiny_config, write_fake_fashion_mnist
    from wgan_lit import classifier as clf
    from wgan_lit.train import train

    tmp = tmp_path_factory.mktemp("ttq")
    data = write_fake_fashion_mnist(tmp / "data", n_train=128, n_test=64)
    weights = clf.save(tiny_classifier(), tmp / "c.pt", test_accuracy=1.0)
    runs = {}
    for name, ema in (("plain", 0.0), ("ema", 0.9)):
        cfg = tiny_config(data, 6, ema_decay=ema)
        m = cfg.metrics
        m.every_n_gen_steps, m.n_samples, m.kid_subsets, m.inception, m.classifier_path = 2, 40, 5, False, str(weights)
        train(cfg, tmp / name)
        runs[name] = tmp / name
    return runs


def test_time_to_quality_draws_and_tabulates_every_run(scored_runs, tmp_path):
    out = tmp_path / "ttq.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "time_to_quality.py"), f"paper={scored_runs['plain']}",
         f"preset={scored_runs['ema']}", "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:-1]}
    assert set(rows) == {"paper", "preset"}
    for row in rows.values():
        assert row[1] == "4" and row[-1] == "6"  # scores at steps 0, 2, 4, 6; the final generator step
    assert out.stat().st_size > 5000 and f"wrote {out}" in proc.stdout


def test_time_to_quality_refuses_a_run_without_scores(tmp_path):
    (tmp_path / "run" / "tensorboard").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "time_to_quality.py"), f"x={tmp_path / 'run'}", "y=/nowhere",
         "--out", str(tmp_path / "t.png")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "expected LABEL=RUN_DIR" in proc.stderr and "y=/nowhere" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "time_to_quality.py"), f"x={tmp_path / 'run'}",
         "--out", str(tmp_path / "t.png")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "0 metrics/fd_classifier scores" in proc.stderr
    assert "metrics.every_n_seconds=60" in proc.stderr and not (tmp_path / "t.png").exists()
