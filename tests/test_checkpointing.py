"""checkpointing.py: every checkpoint write is all or nothing, also when the writer is killed."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ENV
from wgan_lit.checkpointing import atomic_torch_save, remove_stale_temporaries


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
from wgan_lit.checkpointing import atomic_torch_save, remove_stale_temporaries
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


@pytest.mark.slow
def test_the_files_of_a_killed_writer_are_removed_and_a_live_writers_are_kept(tmp_path):
    target = tmp_path / "last.ckpt"
    for _ in range(20):  # kill the writer at random moments until one dies mid-write
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=ENV, stdout=subprocess.PIPE,
                                text=True)
        proc.stdout.readline()
        time.sleep(random.uniform(0.0, 0.2))
        proc.kill()
        proc.wait()
        if list(tmp_path.glob("last.ckpt.tmp-*")):
            break
    (stale,) = tmp_path.glob("last.ckpt.tmp-*")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_tmp = tmp_path / f"last.ckpt.tmp-{live.pid}"
        live_tmp.write_bytes(b"being written")
        assert remove_stale_temporaries(tmp_path) == [stale]
        assert live_tmp.exists() and not stale.exists()
    finally:
        live.kill()
        live.wait()
    torch.load(target, weights_only=True)  # the finished checkpoint is whole
