"""``python tests/ddp_probe.py [overrides]``: the real command line plus a callback that reports what each rank saw.

Every rank (Lightning re-runs this file for ranks > 0) writes ``<run dir>/probe/rank<R>.json`` with hashes of the
critic and generator parameters before and after training, the data indices its sampler served, and its step
counters. tests/test_ddp.py compares the ranks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch

import wgan_lit.train as cli


def params_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Probe(L.Callback):
    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.report["start"] = {"critic": params_hash(pl_module.critic), "generator": params_hash(pl_module.generator)}
        with torch.random.fork_rng(devices=[]):  # a peek at this rank's next noise, without consuming it
            self.report["noise"] = pl_module.noise(2).flatten().tolist()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if "indices" in self.report:
            return  # the first epoch's shard is enough
        sampler = trainer.train_dataloader.sampler
        self.report["sampler"] = type(sampler).__name__
        self.report["indices"] = [int(i) for i in sampler]

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.report.update(
            end={"critic": params_hash(pl_module.critic), "generator": params_hash(pl_module.generator)},
            max_abs_critic=max(p.abs().max().item() for p in pl_module.critic.parameters()),
            gen_step=pl_module.gen_step, global_step=trainer.global_step, world_size=trainer.world_size,
        )
        out = Path(trainer.default_root_dir) / "probe"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.report))


def train_with_probe(*args: Any, _train: Any = cli.train, **kwargs: Any) -> dict[str, float]:
    return _train(*args, extra_callbacks=[Probe()], **kwargs)  # a fresh probe for each job of a sweep


if __name__ == "__main__":
    cli.train = train_with_probe  # main() looks train up at call time
    cli.main()
