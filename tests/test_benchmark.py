"""benchmarks/throughput.py --quick --probe runs end to end and prints every line it promises (no timing checks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
