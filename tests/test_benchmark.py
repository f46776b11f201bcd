"""benchmarks/throughput.py --quick --probe and time_to_quality.py, in-process: every line they promise (no timings)."""

from __future__ import annotations

import importlib.util
import logging
import re

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from tests.conftest import REPO, write_fake_fashion_mnist


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

RATE = re.compile(r"^rate\[(?P<name>[^\]]+)\]: (?P<rate>[\d.]+) gen_iter/s  ratio_vs_plain: (?P<ratio>[\d.]+)  "
                  r"flop_efficiency: (?P<eff>[\d.]+)%  rounds: [\d. ]+$", re.M)

def test_quick_throughput_prints_the_probes_choice_rates_ratios_and_flop_efficiency(tmp_path, monkeypatch, capsys):
    write_fake_fashion_mnist(tmp_path / "data")  # both sides read ./data: the plain loop and the data module
    monkeypatch.chdir(tmp_path)
    variants, quiet = ["lightning", "lightning per-item loader"], logging.getLogger("lightning.pytorch")
    threads, level = torch.get_num_threads(), quiet.level  # the script sets both for its process: restored
    try:
        script("throughput").main(["--quick", "--threads", "1", "--features", "8", "--latent-dim", "16",
                                   "--batch-size", "16", "--n-critic", "1", "--probe", "--variants", *variants])
    finally:
        torch.set_num_threads(threads)
        quiet.setLevel(level)
    out = capsys.readouterr().out
    assert re.search(r"^device: cpu  torch \S+  lightning \S+  threads 1$", out, re.M), out
    assert re.search(r"^flops_per_gen_iter: [\d.]+ GFLOP  matmul_peak: [\d.]+ GFLOP/s$", out, re.M), out
    chosen = re.search(r"^probe: (fast_path choice \((32-true|bf16-mixed), [^)]+\))$", out, re.M)
    assert chosen, out  # the probe's pick, timed next to the fixed settings
    rows = {m["name"]: m for m in RATE.finditer(out)}
    assert list(rows) == ["plain", f"lightning {chosen[1]}", *variants], out
    assert float(rows["plain"]["ratio"]) == 1.0 and all(float(r["ratio"]) > 0 for r in rows.values())
    assert all(float(r["rate"]) > 0 and float(r["eff"]) > 0 for r in rows.values())
    assert [p.name for p in tmp_path.iterdir()] == ["data"], "the benchmark must clean up after itself"

def scored_run(folder, scores: list[float], every_s: float, raw: bool):
    """TensorBoard scores as metrics.every_n_seconds writes them (from step 0, every 2 steps; ``raw``: with EMA)."""
    with SummaryWriter(str(folder / "tensorboard")) as writer:
        for i, score in enumerate(scores):
            writer.add_scalar("metrics/fd_classifier", score, 2 * i, walltime=1000 + every_s * i)
            if raw:
                writer.add_scalar("metrics_raw/fd_classifier", score + 1, 2 * i, walltime=1000 + every_s * i)
    return folder

def test_time_to_quality_draws_and_tabulates_every_run(tmp_path, capsys):
    paper = scored_run(tmp_path / "paper", [90.0, 80.0, 70.0, 60.0], every_s=60, raw=False)
    preset = scored_run(tmp_path / "preset", [50.0, 40.0, 30.0, 20.0], every_s=60, raw=True)
    out = tmp_path / "ttq.png"
    assert script("time_to_quality").main([f"paper={paper}", f"n_critic=1={preset}", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:-1]}
    assert lines[0].split()[:3] == ["run", "scores", "1"] and set(rows) == {"paper", "n_critic=1"}
    # 4 scores; at 1 and 2 minutes, nothing at 5 and later (the run ended at 3); the last score, minutes, step
    assert rows["n_critic=1"][1:] == ["4", "40.0", "30.0", "20.0", "3.0", "6"] and rows["paper"][-1] == "6"
    assert out.stat().st_size > 5000 and lines[-1] == f"wrote {out}"

def test_time_to_quality_refuses_a_run_without_scores_and_a_missing_run(tmp_path, capsys):
    (tmp_path / "run" / "tensorboard").mkdir(parents=True)
    ttq = script("time_to_quality")
    with pytest.raises(SystemExit) as stop:
        ttq.main([f"x={tmp_path / 'run'}", "y=/nowhere", "--out", str(tmp_path / "t.png")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "expected LABEL=RUN_DIR" in err and "y=/nowhere" in err
    with pytest.raises(SystemExit) as stop:
        ttq.main([f"x={tmp_path / 'run'}", "--out", str(tmp_path / "t.png")])
    assert "0 metrics/fd_classifier scores" in stop.value.code and "metrics.every_n_seconds=60" in stop.value.code
    assert not (tmp_path / "t.png").exists()
