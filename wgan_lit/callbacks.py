"""The callbacks of a training run and :func:`build_callbacks`, which orders them. They count generator steps;
Lightning runs ``Checkpoint`` subclasses last, so :class:`LastCheckpoint` saves whatever stop another one asked."""

import dataclasses
import datetime
import io
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.callbacks import Checkpoint, Timer
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from PIL import Image
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from wgan_lit.checkpointing import remove_stale_temporaries
from wgan_lit.config import TrainConfig
from wgan_lit.metrics import sample_quality_callbacks
from wgan_lit.module import WGAN
from wgan_lit.timelapse import build_gif, write_gif_to_tensorboard

log = logging.getLogger(__name__)


def build_callbacks(cfg: TrainConfig, run_dir: Path, datamodule: L.LightningDataModule,
                    extra: Sequence[L.Callback] = ()) -> list[L.Callback]:
    """The run's callbacks in the order they must run (tests/test_callbacks.py checks it)."""
    ckpt_dir, tr, every = run_dir / "checkpoints", cfg.trainer, cfg.logger.sample_every_n_gen_steps
    callbacks: list[L.Callback] = [ResumeState(cfg.seed, run_dir)]
    callbacks += [SampleGrid(run_dir / "samples", every, cfg.logger.timelapse)] if every > 0 else []
    callbacks += [GeneratorStepLimit(cfg.max_gen_steps)] if cfg.max_gen_steps > 0 else []
    # trainer.max_time: our own Timer here (Lightning would append its own after ours). After the stops, the
    # scoring: its last round sees their should_stop and scores the final model.
    callbacks += [Timer(tr["max_time"], interval="step")] if tr.get("max_time") else []
    callbacks += sample_quality_callbacks(cfg.metrics, cfg.data, ckpt_dir, datamodule)
    if tr.get("enable_checkpointing", True):
        callbacks.append(LastCheckpoint(ckpt_dir, cfg.checkpoint_every_n_gen_steps, cfg.checkpoint_every_n_epochs))
    return [*callbacks, *extra, RunReport(cfg, run_dir, tr.get("enable_progress_bar", True))]


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class RunReport(L.Callback):
    """What the run says, on rank 0. At the start, where it runs, on what, how long, where the outputs go; with
    ``progress``, generator steps to the bound that ends it, the rate and the time left: a bar in a terminal, else a
    log line every 10% (every 500 steps when only time bounds it). At the end, the config (flat: ``model/clip_value``)
    and every final metric (``final/<name>``) in TensorBoard's HParams view (or the MLflow or W&B run): the last
    callback, it sees them all."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, progress: bool = True, interactive: bool | None = None) -> None:
        self.cfg, self.run_dir, self.progress, self.bar = cfg, run_dir, progress, None
        self.interactive = sys.stdout.isatty() if interactive is None else interactive

    def on_train_start(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        if not trainer.is_global_zero:
            return
        cfg, hp, step, max_time = self.cfg, pl_module.hparams, pl_module.gen_step, self.cfg.trainer.get("max_time")
        per_epoch, size = max(1, int(trainer.num_training_batches) // hp.n_critic), cfg.data.image_size
        bounds = [(cfg.max_gen_steps, f"max_gen_steps={cfg.max_gen_steps}")] if cfg.max_gen_steps > 0 else []
        if (epochs := trainer.max_epochs) is not None and epochs > 0:
            bounds.append((epochs * per_epoch, f"trainer.max_epochs={epochs}"))
        self.total, bound = min(bounds) if bounds else (None, "")  # the bound that ends the run first
        ends = [f"{bound} ({self.total} generator steps)"] * bool(bounds) + [f"trainer.max_time={max_time}"] * bool(
            max_time)
        images = getattr(trainer.datamodule, "images", None)
        rows = {"device": f"{trainer.strategy.root_device} x {trainer.world_size} process(es), precision "
                          f"{trainer.precision}, {torch.get_num_threads()} CPU thread(s)",
                "data": f"{cfg.data.name} ({cfg.data.split}): {'?' if images is None else len(images)} images of "
                        f"{hp.channels} x {size} x {size}, batch {cfg.data.batch_size} per process",
                "epoch": f"{trainer.num_training_batches} batches = {per_epoch} generator steps "
                         f"(n_critic={hp.n_critic})",
                "resumed at": f"generator step {step}" * bool(step),
                "ends at": " or ".join(ends) + ", whichever comes first" * (len(ends) > 1) or "no bound: stop it with "
                           "Ctrl-C", "outputs": str(self.run_dir)}
        log.info("Training:\n  %s", "\n  ".join(f"{k:<12}{v}" for k, v in rows.items() if v))
        self._start, self.every = (time.monotonic(), step), max(1, (self.total or 5000) // 10)
        self._next_line, self._timer = step + self.every, next((c for c in trainer.callbacks if isinstance(c, Timer)),
                                                                None)
        if self.progress and self.interactive:  # a resumed run: the rate counts this process's steps
            self.bar = tqdm(total=self.total, initial=step, desc="generator steps", dynamic_ncols=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: WGAN, *_: Any) -> None:
        step = pl_module.gen_step
        if self.bar is not None and step != self.bar.n:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{float(v):.3g}" for k, v in trainer.progress_bar_metrics.items()}
                                 | self._time_left())
        elif self.progress and not self.interactive and trainer.is_global_zero and step >= self._next_line:
            self._next_line = step + self.every
            log.info(self.progress_line(step))

    def _time_left(self) -> dict[str, str]:  # what trainer.max_time leaves (its Timer counts a resumed run's too)
        left = self._timer and self._timer.time_remaining()
        return {} if left is None else {"time left": _clock(left)}

    def progress_line(self, step: int) -> str:
        elapsed, total = time.monotonic() - self._start[0], self.total
        rate = (step - self._start[1]) / elapsed if elapsed > 0 else 0.0
        line = f"generator step {step}" + (f"/{total} ({100 * step / total:.0f}%)" if total else "")
        line += f", {rate:.2f} steps/s" + (f", about {_clock((total - step) / rate)} left" if total and rate else "")
        return line + "".join(f", {k} {v}" for k, v in self._time_left().items())

    def on_exception(self, *_: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None

    def on_train_end(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        self.on_exception()
        metrics = {f"final/{k}": float(v) for k, v in trainer.callback_metrics.items()}
        config, step = dataclasses.asdict(self.cfg), pl_module.gen_step
        for logger in trainer.loggers:  # rank 0 only: log_hyperparams and log_metrics are rank_zero_only
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(config, metrics=metrics, step=step)
            elif isinstance(logger, MLFlowLogger | WandbLogger):  # their runs' parameters and final values
                logger.log_hyperparams(config)
                logger.log_metrics(metrics, step=step)


class SampleGrid(L.Callback):
    """The fixed noise's grid at the start, every N generator steps and at the end (``<dirpath>/gen_XXXXXX.png``,
    the loggers' ``samples``), then ``timelapse.gif`` of them beside dirpath. It draws no random numbers."""

    def __init__(self, dirpath: str | Path, every_n_gen_steps: int, timelapse: bool = True) -> None:
        self.dirpath, self.every, self.timelapse, self._last_step = Path(dirpath), every_n_gen_steps, timelapse, -1

    def _render(self, trainer: L.Trainer, module: WGAN) -> None:
        if (step := module.gen_step) == self._last_step or not trainer.is_global_zero:
            return
        self._last_step, images = step, torch.cat([batch.cpu() for batch in module.sample(module.fixed_noise)])
        grid = make_grid(images, nrow=max(1, int(len(images) ** 0.5)), normalize=True, value_range=(-1, 1))
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_image(grid, path := self.dirpath / f"gen_{step:06d}.png")
        self._publish(trainer, path, step, grid.clamp(0, 1))

    on_train_start = _render  # the untrained generator: the first frame of the timelapse

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: WGAN, *_: Any) -> None:
        if pl_module.gen_step % self.every == 0:
            self._render(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        self._render(trainer, pl_module)
        if self.timelapse and trainer.is_global_zero:
            (path := self.dirpath.parent / "timelapse.gif").write_bytes(build_gif(self.dirpath.parent)[0])
            self._publish(trainer, path, pl_module.gen_step)

    @staticmethod
    def _publish(trainer: L.Trainer, path: Path, step: int, grid: torch.Tensor | None = None) -> None:
        """A grid (``samples`` at ``step``) or, with no ``grid``, the GIF (``timelapse``) to the loggers of images."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and grid is not None:
                logger.experiment.add_image("samples", grid, global_step=step)
            elif isinstance(logger, TensorBoardLogger):
                write_gif_to_tensorboard(path.read_bytes(), step=step, writer=logger.experiment)
            elif isinstance(logger, MLFlowLogger) and grid is not None:  # images with a step slider
                logger.experiment.log_image(logger.run_id, Image.open(path), key="samples", step=step)
            elif isinstance(logger, MLFlowLogger):  # the GIF: a file of the run
                logger.experiment.log_artifact(logger.run_id, str(path))
            elif isinstance(logger, WandbLogger):
                logger.log_image("timelapse" if grid is None else "samples", [str(path)], step=step)


class GeneratorStepLimit(L.Callback):
    """Stop after ``max_gen_steps`` generator updates (Lightning's max_steps counts critic steps too)."""

    def __init__(self, max_gen_steps: int) -> None:
        self.max_gen_steps = max_gen_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: WGAN, *_: Any) -> None:
        trainer.should_stop |= pl_module.gen_step >= self.max_gen_steps


class LastCheckpoint(Checkpoint):
    """``last.ckpt`` every N generator steps, at each epoch end, at the stop and on a signal; ``epochNNN-genM.ckpt``
    at every k-th epoch end; all at a batch end, after every other callback (an epoch end's file would lose the
    loader's position). The first SIGINT/SIGTERM finishes the batch, saves and stops, a second Ctrl-C at once: our
    own handlers, as Lightning's stop mid-step and, under DDP, each rank at its own batch (one rank's SIGTERM hung)."""

    def __init__(self, dirpath: str | Path, every_n_gen_steps: int = 0, every_n_epochs: int = 1) -> None:
        self.dirpath, self.every, self.every_n_epochs = Path(dirpath), every_n_gen_steps, every_n_epochs
        self.received: int | None = None  # the signal that asked for the stop
        self._saved_at, self._previous = (-1, -1), {}  # (gen_step, global_step) of last.ckpt; the handlers before

    def _save(self, trainer: L.Trainer, pl_module: WGAN, name: str = "last.ckpt") -> None:
        at = (pl_module.gen_step, trainer.global_step)
        if not trainer.fast_dev_run and (name != "last.ckpt" or at != self._saved_at):
            trainer.save_checkpoint(self.dirpath / name, weights_only=False)  # rank 0 writes, atomically (plugin)
            self._saved_at = at if name == "last.ckpt" else self._saved_at

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists: no checkpoint
        self.received = signum
        rank_zero_info(f"\n{signal.Signals(signum).name} received: finishing this batch, saving a checkpoint, "
                       "then stopping (Ctrl-C again to stop at once without saving).")

    def on_train_start(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        for path in remove_stale_temporaries(self.dirpath) if trainer.is_global_zero else []:  # rank 0 writes
            log.info("Removed %s, left by a writer that was killed", path)
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: WGAN, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signalled = self.received is not None
        if trainer.world_size > 1:  # any rank's signal stops every rank at this same batch
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        epoch_done, epoch = batch_idx + 1 >= trainer.num_training_batches, trainer.current_epoch
        due = self.every > 0 and pl_module.critic_step_in_iter == 0 and pl_module.gen_step % self.every == 0
        if signalled or trainer.should_stop or due or epoch_done:
            self._save(trainer, pl_module)
        if epoch_done and (epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer, pl_module, f"epoch{epoch:03d}-gen{pl_module.gen_step}.ckpt")
        if signalled:
            raise SIGTERMException(128 + (self.received or signal.SIGTERM))  # train._main says how to resume

    def on_train_end(self, *_: Any) -> None:  # also on an exception: the handlers from before the run
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    on_exception = on_train_end


class OneRunDirError(RuntimeError):
    """The ranks of one distributed run resolved different run directories."""


class ResumeState(L.Callback):
    """What every checkpoint needs beyond Lightning's: every rank's RNG states (they draw the noise; gathered for
    rank 0 to write, put back rank by rank) and finite weights (a diverged run writes no file). A fresh DDP run seeds
    each rank from (seed, rank); a resume takes its learning rates from the config. At setup, the ranks must share
    one run directory (ranks that torchrun or srun start each resolve ``${now:...}`` in ``hydra.run.dir``)."""

    def __init__(self, seed: int, run_dir: str | Path = "") -> None:
        self.seed, self.run_dir, self._to_restore = seed, str(Path(run_dir).resolve()), None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if len(set(dirs := _gather(trainer, self.run_dir))) > 1:
            shown = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(dirs))
            raise OneRunDirError(
                f"The {len(dirs)} processes of this run chose different run directories:\n{shown}\nThey were started "
                "separately (torchrun or srun), and each resolved the time in hydra.run.dir itself. Give them one "
                "directory, e.g. hydra.run.dir=outputs/$SLURM_JOB_ID (srun) or hydra.run.dir=outputs/run1 (torchrun).")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        if "numpy" in states:  # a tensor instead of an ndarray: torch.load(weights_only=True) accepts it
            name, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached))
        torch.save(states, buf := io.BytesIO())  # as bytes: all_gather_object cannot unpickle tensors itself
        ranks = _gather(trainer, buf.getvalue())
        checkpoint["rng_states"] = [torch.load(io.BytesIO(b), weights_only=True) for b in ranks]
        if isinstance(pl_module, WGAN):
            pl_module.check_finite()  # raises DivergenceError before the file is opened

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._to_restore = checkpoint.get("rng_states")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hp, ranks, self._to_restore = pl_module.hparams, self._to_restore, None
        if "lr_g" in hp and len(trainer.optimizers) == 2:  # configure_optimizers' order: generator, critic
            for opt, lr in zip(trainer.optimizers, (hp.lr_g, hp.lr_d), strict=True):
                for group in opt.param_groups:
                    group["lr"] = lr
        # Now, after Lightning has fetched the first batch and before any noise is drawn: it goes on exactly.
        if ranks is not None and len(ranks) == trainer.world_size:
            states = dict(ranks[trainer.global_rank])
            if (cuda := states.pop("torch.cuda", None)) and torch.cuda.device_count() == len(cuda):
                states["torch.cuda"] = cuda
            elif cuda:
                rank_zero_warn("The checkpoint's CUDA RNG states do not fit this machine's GPUs; not restored.")
            if "numpy" in states:
                name, keys, pos, has_gauss, cached = states["numpy"]
                states["numpy"] = (name, keys.numpy(), pos, has_gauss, cached)
            return _set_rng_states(states)
        if ranks is not None:
            rank_zero_warn(f"The checkpoint holds the RNG states of {len(ranks)} processes, this run has "
                           f"{trainer.world_size}: the noise is reseeded, so the run will not repeat exactly.")
        if trainer.world_size > 1 or ranks is not None:
            step = int(getattr(pl_module, "gen_step", 0))
            entropy = np.random.SeedSequence([self.seed, trainer.global_rank, step]).generate_state(1)[0]
            torch.manual_seed(int(entropy))  # seeds the CPU and every CUDA generator


def _gather(trainer: L.Trainer, obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (this one's alone outside a process group)."""
    if trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
