"""checkpointing.py: every checkpoint write is all or nothing, also when the writer is killed."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ENV
from wgan_lit.checkpointing import atomic_torch_save


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
