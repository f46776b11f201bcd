"""benchmarks/gpu_check.sh where there is no CUDA GPU: it says so and exits 0 at once; a wrong argument is one line.
Its helpers' logic that runs the same on any machine: which requirements it installs, the checkpoint comparison."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


def run_script(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    # This interpreter has torch; CUDA_VISIBLE_DEVICES="" hides any GPU, so the test holds on a GPU machine too.
    base = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "", **env})


@pytest.mark.parametrize("where", ["argument", "OUT", "default"])
def test_without_cuda_it_says_so_writes_only_the_summary_and_exits_0_at_once(tmp_path, where):
    out = {"argument": tmp_path / "given", "OUT": tmp_path / "from_env", "default": tmp_path / "gpu_check_out"}[where]
    start = time.monotonic()
    proc = run_script([str(out)] if where == "argument" else [], tmp_path,
                      **({"OUT": str(out)} if where == "OUT" else {}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - start < 60  # one torch import, no install, no data, no training
    line = f"gpu_check: skipped, no CUDA GPU: torch {__import__('torch').__version__} in {sys.executable} finds none"
    assert proc.stdout == line + "\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == [out.name, "summary.txt"]
    assert (out / "summary.txt").read_text() == line + "\n"


@pytest.mark.parametrize("args", [["--quick"], ["a", "b"]], ids=["option", "two-folders"])
def test_a_wrong_argument_is_one_line_exit_2_and_nothing_written(tmp_path, args):
    proc = run_script(args, tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("Error: gpu_check.sh takes one optional argument, the output folder; got: ")
    assert len(proc.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


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
