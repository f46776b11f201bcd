"""What a run needs under DDP beyond Lightning's strategy: one output directory per run, fresh noise per rank.

Gradients are averaged by DDP itself (``trainer=ddp`` / ``ddp_cpu``). Every rank is seeded alike, so without
:class:`NoisePerRank` all ranks would draw the same latent noise and their fake batches would be copies.

Lightning starts ranks 1..N-1 of a node by re-running the command line (``sys.argv``) with
``hydra.run.dir=<HydraConfig().run.dir>`` appended, so those ranks write into rank 0's directory. That is right
for a single run, but under a multirun sweep it re-runs the *whole sweep* in a new sweep directory
(Lightning-AI/pytorch-lightning#15689; the fix, #18175, is unmerged), and the next job of the sweep finds the
last job's process group and launcher environment still set. :func:`ddp_job` makes the re-run command this one
job and clears what the launcher left when the job ends. Processes that torchrun or srun start each run Hydra
themselves and each resolve the ``${now:...}`` in ``hydra.run.dir``; :class:`OneRunDir` stops such a run at once
with the fix in the message.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write


def relaunch_ranks_as_this_job() -> None:
    """Under ``-m``, make Lightning's re-run of the command line this job alone, in this job's directory."""
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return  # a single run: Lightning already re-runs it with hydra.run.dir = this run's directory
    # The job's own overrides (sweep lists already split into this job's values), without -m.
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    # Lightning appends hydra.run.dir=<run.dir>; under -m that must be the job's sweep subdirectory.
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir


# What Lightning's subprocess launcher puts in rank 0's environment (lightning.fabric...subprocess_script).
_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def ddp_job() -> Iterator[None]:
    """Scope of one Hydra job that may start DDP: ranks > 0 re-run this job alone, and the job leaves no
    process group or launcher variables behind for the next job of a sweep (which then launches its own)."""
    relaunch_ranks_as_this_job()
    env_before = {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    had_group = dist.is_available() and dist.is_initialized()  # a group from before this job is not ours
    try:
        yield
    finally:
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in env_before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class OneRunDirError(RuntimeError):
    """The ranks of one distributed run resolved different run directories."""


class OneRunDir(L.Callback):
    """Check at setup that every rank writes into the same run directory; raise on all ranks if not."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = str(Path(run_dir).resolve())

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
            return
        dirs: list[str | None] = [None] * trainer.world_size
        dist.all_gather_object(dirs, self.run_dir)
        if len(set(dirs)) > 1:
            shown = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(dirs))
            raise OneRunDirError(
                f"The {trainer.world_size} processes of this run chose different run directories:\n{shown}\n"
                "They were started separately (torchrun or srun), and each resolved the time in hydra.run.dir "
                "itself. Give them one directory, e.g. hydra.run.dir=outputs/$SLURM_JOB_ID (srun) or "
                "hydra.run.dir=outputs/run1 (torchrun)."
            )


class NoisePerRank(L.Callback):
    """Under DDP, reseed each rank's random numbers (the latent noise) from (seed, rank, gen_step) when training
    starts, so the ranks draw different noise, also after a resume (which restores one rank's RNG state on all).

    Parameters stay identical: they were initialised before this and DDP broadcasts rank 0's anyway. The data
    shards come from the distributed sampler, which has its own seed. Put it after any callback that restores
    RNG states in ``on_train_start``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            gen_step = int(getattr(pl_module, "gen_step", 0))
            entropy = np.random.SeedSequence([self.seed, trainer.global_rank, gen_step]).generate_state(1)[0]
            torch.manual_seed(int(entropy))  # seeds the CPU and every CUDA generator
