"""``python tests/ddp_probe.py [overrides]``: the real command line, and each rank (Lightning re-runs this file for
ranks > 0) writes ``<run dir>/probe/rank<R>-from<start step>.json``: the dataset indices of every batch it was served,
a fingerprint of each it trained on, a hash of the weights after each generator step, a peek at its next noise, its
sampler and counters. ``PROBE_EVENT=R:SIGTERM:N`` (or SIGKILL): rank R signals itself as its N-th batch starts;
``R:NaN:N``: its batches are NaN from the N-th on; ``R:...:N:WORD``: only in the job whose command line holds WORD."""

import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

import wgan_lit.data as data
import wgan_lit.train as cli

SERVED: list[list[int]] = []  # the dataset indices of each batch this process was served (num_workers=0), in order
real_getitems = data.InMemoryImages.__getitems__
data.InMemoryImages.__getitems__ = lambda self, idx: SERVED.append([int(i) for i in idx]) or real_getitems(self, idx)


class Probe(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        SERVED.clear()  # this job's batches only (a sweep runs several in one process); none is served before
        self.report: dict[str, Any] = {"batches": [], "indices": SERVED, "weights": {}}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        dl = trainer.train_dataloader
        inner = getattr(dl.batch_sampler, "sampler", dl.sampler)
        with torch.random.fork_rng(devices=[]):  # a peek at this rank's next noise, without consuming it
            noise = pl_module.noise(2).flatten().tolist()
        self.report.update(start_gen_step=pl_module.gen_step, sampler=type(inner).__name__, noise=noise,
                           start_batch=trainer.global_step - pl_module.gen_step)  # one critic step per batch

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: torch.Tensor, batch_idx: int) -> None:
        # Images are distinct, so the sorted pixel sums of a batch identify which images it holds.
        self.report["batches"].append(sorted(batch.flatten(1).sum(1).round(decimals=3).tolist()))
        rank, event, at, *words = os.environ.get("PROBE_EVENT", "-:-:0").split(":")
        if rank == str(trainer.global_rank) and len(self.report["batches"]) >= int(at) and set(words) <= set(sys.argv):
            if event == "NaN":
                batch.fill_(float("nan"))  # the batch training_step gets
            elif len(self.report["batches"]) == int(at):
                os.kill(os.getpid(), getattr(signal, event))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *_: Any) -> None:
        if pl_module.critic_step_in_iter == 0:  # a generator step ended: every weight, bit for bit
            weights = b"".join(p.detach().cpu().numpy().tobytes() for _, p in sorted(pl_module.named_parameters()))
            self.report["weights"][pl_module.gen_step] = hashlib.sha256(weights).hexdigest()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any, *_: Any) -> None:
        self.report.update(max_abs_critic=max(p.abs().max().item() for p in pl_module.critic.parameters()),
                           gen_step=pl_module.gen_step, global_step=trainer.global_step, world_size=trainer.world_size)
        out = Path(trainer.default_root_dir) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        name = f"rank{trainer.global_rank}-from{self.report['start_gen_step']}.json"
        (out / name).write_text(json.dumps(self.report))

    on_exception = on_train_end  # an interrupted run reports what it trained on, too


if __name__ == "__main__":
    real_train = cli.train
    cli.train = lambda *a, **k: real_train(*a, extra_callbacks=[Probe()], **k)  # main() looks train up when it runs
    cli.main()
