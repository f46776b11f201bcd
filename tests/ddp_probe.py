"""``python tests/ddp_probe.py [overrides]``: the real command line plus a callback that reports what each rank saw.

Every rank (Lightning re-runs this file for ranks > 0) writes ``<run dir>/probe/rank<R>-<start step>.json``:
hashes of the critic and generator parameters at the end, a fingerprint of every batch it trained on, the dataset
indices of every batch it was served, a peek at its next noise when training starts, and its step counters.
tests/test_train.py and tests/test_ddp.py compare the ranks and runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

import wgan_lit.data as data
import wgan_lit.train as cli


def params_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


SERVED: list[list[int]] = []  # the dataset indices of each batch this process was served, in order


def record_served_indices() -> None:
    """Every data module's batches are one ``__getitems__`` call (num_workers=0: in this process); note them."""
    real = data.InMemoryImages.__getitems__

    def getitems(self: data.InMemoryImages, indices: list[int]) -> torch.Tensor:
        SERVED.append([int(i) for i in indices])
        return real(self, indices)

    data.InMemoryImages.__getitems__ = getitems


class Probe(L.Callback):
    def __init__(self) -> None:
        self.report: dict[str, Any] = {"batches": [], "indices": SERVED}

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        SERVED.clear()  # this job's batches only (a sweep runs several in one process); none is served before

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.report["start_gen_step"] = pl_module.gen_step
        dl = trainer.train_dataloader
        inner = getattr(dl.batch_sampler, "sampler", dl.sampler)
        self.report["sampler"] = [type(dl.sampler).__name__, type(dl.batch_sampler).__name__, type(inner).__name__,
                                  getattr(inner, "epoch", None), getattr(inner, "seed", None)]
        with torch.random.fork_rng(devices=[]):  # a peek at this rank's next noise, without consuming it
            self.report["noise"] = pl_module.noise(2).flatten().tolist()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: torch.Tensor, batch_idx: int) -> None:
        # Images are distinct, so the sorted pixel sums of a batch identify which images it holds.
        self.report["batches"].append(sorted(batch.flatten(1).sum(1).round(decimals=3).tolist()))

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)  # an interrupted run reports what it trained on, too

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.report.update(
            end={"critic": params_hash(pl_module.critic), "generator": params_hash(pl_module.generator)},
            max_abs_critic=max(p.abs().max().item() for p in pl_module.critic.parameters()),
            gen_step=pl_module.gen_step, global_step=trainer.global_step, world_size=trainer.world_size,
        )
        out = Path(trainer.default_root_dir) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        name = f"rank{trainer.global_rank}-from{self.report['start_gen_step']}.json"
        (out / name).write_text(json.dumps(self.report))


def train_with_probe(*args: Any, _train: Any = cli.train, **kwargs: Any) -> dict[str, float]:
    return _train(*args, extra_callbacks=[Probe()], **kwargs)  # a fresh probe for each job of a sweep


def nan_after(n_batches: int) -> None:
    """From batch ``n_batches + 1`` on, this process's batches are NaN (a divergence on one rank only)."""
    real, calls = data.to_unit_range, [0]

    def to_unit_range(batch: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return real(batch).fill_(float("nan")) if calls[0] > n_batches else real(batch)

    data.to_unit_range = to_unit_range


if __name__ == "__main__":
    # PROBE_NAN_RANK=R PROBE_NAN_AFTER=N: rank R's batches turn NaN after N (Lightning sets LOCAL_RANK for R > 0).
    if os.environ.get("PROBE_NAN_RANK") == os.environ.get("LOCAL_RANK", "0"):
        nan_after(int(os.environ["PROBE_NAN_AFTER"]))
    record_served_indices()
    cli.train = train_with_probe  # main() looks train up at call time
    cli.main()
