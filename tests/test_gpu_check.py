"""benchmarks/gpu_check.sh without CUDA (one line, exit 0 at once), a wrong argument; gpu_check.py's logic."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO
from tests.test_benchmark import script

gpu_check = script("gpu_check")


def run_script(args: list[str], cwd, python: str = sys.executable, **env: str) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU from torch, so the test holds on a GPU machine too.
    base = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**base, "PYTHON": python, "CUDA_VISIBLE_DEVICES": "", **env})

@pytest.mark.parametrize("where", ["argument", "OUT", "default"])
def test_without_cuda_it_says_so_writes_only_the_summary_and_exits_0_at_once(tmp_path, where):
    """This interpreter's torch answers once; where only the output folder differs, a stand-in for it (fast)."""
    python, version = (sys.executable, torch.__version__) if where == "argument" else (tmp_path / "python", "9.9")
    if where != "argument":
        python.write_text("#!/bin/sh\necho False 9.9\n")
        python.chmod(0o755)
    (cwd := tmp_path / "cwd").mkdir()
    out = {"argument": cwd / "given", "OUT": cwd / "from_env", "default": cwd / "gpu_check_out"}[where]
    start = time.monotonic()
    proc = run_script([str(out)] if where == "argument" else [], cwd, str(python),
                      **({"OUT": str(out)} if where == "OUT" else {}))
    assert proc.returncode == 0 and time.monotonic() - start < 60, proc.stdout + proc.stderr  # no install, no data
    line = f"gpu_check: skipped, no CUDA GPU: torch {version} in {python} finds none\n"
    assert proc.stdout == line and (out / "summary.txt").read_text() == line
    assert sorted(p.name for p in cwd.rglob("*")) == [out.name, "summary.txt"]

@pytest.mark.parametrize("args", [["--quick"], ["a", "b"]], ids=["option", "two-folders"])
def test_a_wrong_argument_is_one_line_exit_2_and_nothing_written(tmp_path, args):
    proc = run_script(args, tmp_path)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1 and not any(
        tmp_path.iterdir())
    assert proc.stderr.startswith("Error: gpu_check.sh takes one optional argument, the output folder; got: ")

def test_it_installs_only_the_missing_requirements_and_never_torch(monkeypatch):
    assert gpu_check.missing() == []  # control: this environment has everything
    real = importlib.metadata.distribution

    def absent(name):
        if name in ("torchdata", "hydra-core", "torch", "pytest"):
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    listed = gpu_check.missing()  # requirement strings as pyproject.toml writes them, in its order
    assert [re.split(r"[<>=!~;\[ ]", r)[0] for r in listed] == ["hydra-core", "torchdata", "pytest"], listed

def test_compare_sees_a_difference_in_any_tensor_however_deep(tmp_path):
    ckpt = {"wgan_counters": {"gen_step": 3}, "state_dict": {"w": torch.ones(2)},
            "rng_states": [{"torch": torch.arange(4, dtype=torch.uint8), "numpy": ("MT19937", torch.arange(3))}]}
    torch.save(ckpt, tmp_path / "a.ckpt")
    ckpt["rng_states"][0]["numpy"] = ("MT19937", torch.tensor([0, 1, 3]))
    torch.save(ckpt, tmp_path / "b.ckpt")
    ok, line = gpu_check.compare(tmp_path / "a.ckpt", tmp_path / "a.ckpt")
    assert ok and line.startswith("all 3 tensors of both checkpoints equal"), line
    ok, line = gpu_check.compare(tmp_path / "a.ckpt", tmp_path / "b.ckpt")
    assert not ok and line.startswith("1 of 3 tensors differ (first: /rng_states/0/numpy/1)"), line
