"""Every callback of a training run, and :func:`build_callbacks`, the one place that orders them.

All of them count in generator steps (``WGAN.gen_step``), the unit of the logged curves and of
``max_gen_steps``. Lightning runs callbacks in list order, except ``Checkpoint`` subclasses, which it runs last:
:class:`LastCheckpoint` therefore sees every stop any other callback (or ``trainer.max_time``) asks for at a batch.
"""

from __future__ import annotations

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
from lightning.pytorch.callbacks import Checkpoint, Timer, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torchvision.utils import make_grid, save_image

from wgan_lit.checkpointing import remove_stale_temporaries
from wgan_lit.config import TrainConfig
from wgan_lit.metrics import sample_quality_callbacks
from wgan_lit.module import WGAN
from wgan_lit.timelapse import build_gif, write_gif_to_tensorboard

log = logging.getLogger(__name__)


def build_callbacks(cfg: TrainConfig, run_dir: Path, datamodule: L.LightningDataModule,
                    extra: Sequence[L.Callback] = ()) -> list[L.Callback]:
    """The run's callbacks in the order they must run (tests/test_callbacks.py checks it)."""
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[L.Callback] = [ResumeState(cfg.seed), OneRunDir(run_dir), DivergenceGuard(),
                                   StartSummary(cfg, run_dir)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(RunProgressBar(cfg.max_gen_steps))
    if cfg.logger.sample_every_n_gen_steps > 0:
        callbacks.append(SampleGrid(run_dir / "samples", cfg.logger.sample_every_n_gen_steps, cfg.logger.timelapse))
    if cfg.max_gen_steps > 0:
        callbacks.append(GeneratorStepLimit(cfg.max_gen_steps))
    if cfg.trainer.get("max_time"):  # here rather than Lightning's own, which it would append after ours
        callbacks.append(Timer(cfg.trainer["max_time"], interval="step"))
    # After the stops: the last scoring sees their should_stop and scores the final model.
    callbacks += sample_quality_callbacks(cfg.metrics, cfg.data, ckpt_dir, datamodule)
    if cfg.trainer.get("enable_checkpointing", True):
        callbacks.append(LastCheckpoint(ckpt_dir, cfg.checkpoint_every_n_gen_steps, cfg.checkpoint_every_n_epochs))
    callbacks += extra
    callbacks.append(HParamsSummary(dataclasses.asdict(cfg)))  # last: sees every metric logged at the end
    return callbacks


def gen_steps_per_epoch(trainer: L.Trainer, module: WGAN) -> int:
    return max(1, int(trainer.num_training_batches) // module.hparams.n_critic)


def binding_bound(trainer: L.Trainer, module: WGAN, max_gen_steps: int) -> tuple[int | None, str]:
    """(generator steps at which the run ends, which bound that is); None when only time bounds it."""
    bounds = []
    if max_gen_steps > 0:
        bounds.append((max_gen_steps, f"max_gen_steps={max_gen_steps}"))
    if trainer.max_epochs is not None and trainer.max_epochs > 0:
        bounds.append((trainer.max_epochs * gen_steps_per_epoch(trainer, module),
                       f"trainer.max_epochs={trainer.max_epochs}"))
    return min(bounds) if bounds else (None, "")


class StartSummary(L.Callback):
    """One block when training starts, on rank 0: where it runs, on what, how long, where the outputs go."""

    def __init__(self, cfg: TrainConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir

    def on_train_start(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        if not trainer.is_global_zero:
            return
        cfg = self.cfg
        steps, bound = binding_bound(trainer, pl_module, cfg.max_gen_steps)
        ends = [f"{bound} ({steps} generator steps)"] if steps else []
        if cfg.trainer.get("max_time"):
            ends.append(f"trainer.max_time={cfg.trainer['max_time']}")
        n_images = len(trainer.datamodule.images) if getattr(trainer.datamodule, "images", None) is not None else "?"
        lines = [
            f"device      {trainer.strategy.root_device} x {trainer.world_size} process(es), precision "
            f"{trainer.precision}, {torch.get_num_threads()} CPU thread(s)",
            f"data        {cfg.data.name} ({cfg.data.split}): {n_images} images of {pl_module.hparams.channels} x "
            f"{cfg.data.image_size} x {cfg.data.image_size}, batch {cfg.data.batch_size} per process",
            f"epoch       {trainer.num_training_batches} batches = {gen_steps_per_epoch(trainer, pl_module)} "
            f"generator steps (n_critic={pl_module.hparams.n_critic})",
            f"ends at     {' or '.join(ends) if ends else 'no bound: stop it with Ctrl-C'}"
            + (", whichever comes first" if len(ends) > 1 else ""),
            f"outputs     {self.run_dir}",
        ]
        if pl_module.gen_step:
            lines.insert(3, f"resumed at  generator step {pl_module.gen_step}")
        log.info("Training:\n  %s", "\n  ".join(lines))


class RunProgressBar(TQDMProgressBar):
    """One bar for the whole run: generator steps against the bound that ends it, with the rate and time left.

    In a terminal it is Lightning's tqdm bar; elsewhere (a log file, CI) one line every 10% of the run (every 500
    steps when only time bounds it), so train.log stays readable.
    """

    def __init__(self, max_gen_steps: int, interactive: bool | None = None) -> None:
        super().__init__()
        self.max_gen_steps = max_gen_steps
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.total: int | None = None
        self._start = (0.0, 0)  # (time, generator step) when this process began training
        self._next_line = 0
        self._timer: Timer | None = None

    @property
    def is_disabled(self) -> bool:
        return super().is_disabled or not self.interactive

    def on_train_start(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        super().on_train_start(trainer, pl_module)
        self.total, _ = binding_bound(trainer, pl_module, self.max_gen_steps)
        bar = self.train_progress_bar
        bar.reset(total=self.total)
        bar.initial = bar.n = pl_module.gen_step  # a resumed run: the rate counts this process's steps
        bar.set_description("generator steps")
        self._start = (time.monotonic(), pl_module.gen_step)
        self._timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        self._next_line = pl_module.gen_step + self._line_every()

    def _line_every(self) -> int:
        return max(1, self.total // 10) if self.total else 500

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        pass  # one bar for the run, not one per epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        pass

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: WGAN, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, bar = pl_module.gen_step, self.train_progress_bar
        if step != bar.n and self._should_update(step, bar.total or float("inf")):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module) | self._time_left())
        if not self.interactive and step >= self._next_line and trainer.is_global_zero:
            self._next_line = step + self._line_every()
            log.info(self.progress_line(step))

    def _time_left(self) -> dict[str, str]:
        """What trainer.max_time leaves, from its Timer (which counts a resumed run's earlier time too)."""
        left = self._timer.time_remaining() if self._timer is not None else None
        return {} if left is None else {"time left": _clock(left)}

    def progress_line(self, step: int) -> str:
        elapsed = time.monotonic() - self._start[0]
        rate = (step - self._start[1]) / elapsed if elapsed > 0 else 0.0
        line = f"generator step {step}" + (f"/{self.total} ({100 * step / self.total:.0f}%)" if self.total else "")
        line += f", {rate:.2f} steps/s"
        if self.total and rate > 0:
            line += f", about {_clock((self.total - step) / rate)} left"
        return line + "".join(f", {k} {v}" for k, v in self._time_left().items())


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


class SampleGrid(L.Callback):
    """Every ``every_n_gen_steps`` generator steps, render the fixed noise batch as one grid.

    The grid goes to TensorBoard (tag ``samples``) and to ``<dirpath>/gen_XXXXXX.png``; at the end of training
    the grids become ``<dirpath>/../timelapse.gif`` (and TensorBoard tag ``timelapse``). Sampling runs BatchNorm
    in inference mode and draws no random numbers, so it never changes the course of training.
    """

    def __init__(self, dirpath: str | Path, every_n_gen_steps: int, timelapse: bool = True) -> None:
        self.dirpath = Path(dirpath)
        self.every, self.timelapse = every_n_gen_steps, timelapse
        self._last_step = -1

    def _render(self, trainer: L.Trainer, module: WGAN) -> None:
        step = module.gen_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        images = module.generate(module.fixed_noise).float()
        grid = make_grid(images, nrow=max(1, int(len(images) ** 0.5)), normalize=True, value_range=(-1, 1))
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.dirpath / f"gen_{step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid.clamp(0, 1).cpu(), global_step=step)

    def on_train_start(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        self._render(trainer, pl_module)  # the untrained generator: the first frame of the timelapse

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: WGAN, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.gen_step % self.every == 0:
            self._render(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        self._render(trainer, pl_module)
        if not (self.timelapse and trainer.is_global_zero):
            return
        gif, _ = build_gif(self.dirpath.parent)
        (self.dirpath.parent / "timelapse.gif").write_bytes(gif)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                write_gif_to_tensorboard(gif, step=pl_module.gen_step, writer=logger.experiment)


class GeneratorStepLimit(L.Callback):
    """Stop after ``max_gen_steps`` generator updates (Lightning's max_steps counts critic steps too)."""

    def __init__(self, max_gen_steps: int) -> None:
        self.max_gen_steps = max_gen_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: WGAN, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.gen_step >= self.max_gen_steps:
            trainer.should_stop = True


class LastCheckpoint(Checkpoint):
    """Own ``<dirpath>/last.ckpt`` and the periodic ``epochNNN-genM.ckpt`` files.

    ``last.ckpt`` is written every N generator steps, at the end of every epoch, when a run stops and on a
    signal; ``epochNNN-genM.ckpt`` at the end of every k-th epoch. All at a batch end: Lightning runs
    ``Checkpoint`` callbacks after all others, so this one saves the state of the batch at which any of them
    stopped the run, and an epoch's file is written only once its last batch is done. (Lightning skips the
    data position of a checkpoint written in ``on_train_epoch_end``, and a resumed run then replays the
    epoch's order.)

    The first SIGINT (Ctrl-C) or SIGTERM finishes the batch, saves, and raises ``SIGTERMException``; a second
    Ctrl-C stops at once. Own handlers because Lightning's (2.6) leave SIGINT to a KeyboardInterrupt in the
    middle of a step, and under DDP let each rank stop at its own batch: measured, a SIGTERM to rank 1 alone
    of a 2-process trainer=ddp_cpu run left it hanging (killed after 60 s); with these the ranks decide
    together and it stopped, saved, in 1.1 s. Not OnExceptionCheckpoint: it saves on any exception, a
    divergence too, over the last good file.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dirpath: str | Path, every_n_gen_steps: int = 0, every_n_epochs: int = 1) -> None:
        self.dirpath = Path(dirpath)
        self.path = self.dirpath / "last.ckpt"
        self.every, self.every_n_epochs = every_n_gen_steps, every_n_epochs
        self.received: int | None = None  # the signal that asked for the stop
        self._saved_at: tuple[int, int] | None = None  # (gen_step, global_step) of the last write of last.ckpt
        self._previous: dict[int, Any] = {}

    def _save(self, trainer: L.Trainer, pl_module: WGAN, path: Path | None = None) -> None:
        key = (pl_module.gen_step, trainer.global_step)
        if trainer.fast_dev_run or (path is None and key == self._saved_at):
            return
        trainer.save_checkpoint(path or self.path, weights_only=False)  # rank 0 writes, atomically (plugin)
        if path is None:
            self._saved_at = key

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists: no checkpoint
        self.received = signum
        rank_zero_info(f"\n{signal.Signals(signum).name} received: finishing this batch, saving a checkpoint, "
                       "then stopping (Ctrl-C again to stop at once without saving).")

    def on_train_start(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        if trainer.is_global_zero:  # what a killed writer of this run left (rank 0 writes every checkpoint)
            for path in remove_stale_temporaries(self.dirpath):
                log.info("Removed %s, left by a writer that was killed", path)
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: WGAN, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        signalled = self.received is not None
        if trainer.world_size > 1:  # any rank's signal stops every rank at this same batch
            signalled = trainer.strategy.reduce_boolean_decision(signalled, all=False)
        epoch_done = batch_idx + 1 >= trainer.num_training_batches
        generator_stepped = pl_module.critic_step_in_iter == 0
        due = self.every > 0 and generator_stepped and pl_module.gen_step % self.every == 0
        if signalled or trainer.should_stop or due or epoch_done:
            self._save(trainer, pl_module)
        if epoch_done and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            name = f"epoch{trainer.current_epoch:03d}-gen{pl_module.gen_step}.ckpt"
            self._save(trainer, pl_module, self.dirpath / name)
        if signalled:
            raise SIGTERMException(128 + (self.received or signal.SIGTERM))  # train.main prints the resume

    def on_exception(self, trainer: L.Trainer, pl_module: WGAN, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_end(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        self._restore_handlers()


class ResumeState(L.Callback):
    """What Lightning's checkpoints leave out: every rank's RNG states (they draw the noise batches).

    Lightning saves weights, optimizers, loop counters and the data loader's position, but no RNG state. Here
    each checkpoint holds the states of all ranks (gathered: only rank 0 writes the file) and a resumed run puts
    them back, rank by rank. A fresh DDP run seeds each rank from (seed, rank) so ranks draw different noise.
    A resumed run also takes its learning rates from the config, so a resume can lower them.
    """

    STATE_KEY = "rng_states"

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._to_restore: list[dict[str, Any]] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        if "numpy" in states:  # a tensor instead of an ndarray, so torch.load(weights_only=True) accepts it
            name, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached))
        ranks: list[Any] = [states]
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            # As torch.save bytes: all_gather_object cannot unpickle tensors itself (torch 2.14).
            buf = io.BytesIO()
            torch.save(states, buf)
            gathered: list[Any] = [None] * trainer.world_size
            dist.all_gather_object(gathered, buf.getvalue())
            ranks = [torch.load(io.BytesIO(b), weights_only=True) for b in gathered]
        checkpoint[self.STATE_KEY] = ranks

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._to_restore = checkpoint.get(self.STATE_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        hp = pl_module.hparams
        if "lr_g" in hp and len(trainer.optimizers) == 2:  # configure_optimizers' order: generator, critic
            for opt, lr in zip(trainer.optimizers, (hp.lr_g, hp.lr_d), strict=True):
                for group in opt.param_groups:
                    group["lr"] = lr
        # Here, after Lightning has built the data loader and fetched the first batch, and before any noise is
        # drawn: the noise then continues exactly where the checkpointed run left it.
        ranks, self._to_restore = self._to_restore, None
        if ranks is not None and len(ranks) == trainer.world_size:
            _restore(ranks[trainer.global_rank])
            return
        if ranks is not None:
            rank_zero_warn(f"The checkpoint holds the RNG states of {len(ranks)} processes, this run has "
                           f"{trainer.world_size}: the noise is reseeded, so the run will not repeat exactly.")
        if trainer.world_size > 1 or ranks is not None:
            step = int(getattr(pl_module, "gen_step", 0))
            entropy = np.random.SeedSequence([self.seed, trainer.global_rank, step]).generate_state(1)[0]
            torch.manual_seed(int(entropy))  # seeds the CPU and every CUDA generator


def _restore(states: dict[str, Any]) -> None:
    states = dict(states)
    cuda = states.pop("torch.cuda", None)
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        states["torch.cuda"] = cuda
    elif cuda:
        rank_zero_warn("The checkpoint's CUDA RNG states do not fit this machine's GPUs; not restored.")
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        states["numpy"] = (name, keys.numpy(), pos, has_gauss, cached)
    _set_rng_states(states)


class DivergenceGuard(L.Callback):
    """Refuse to write any checkpoint once a loss or a weight is NaN/inf; the good files on disk stay."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if isinstance(pl_module, WGAN):
            pl_module.check_finite()  # raises DivergenceError before the file is opened


class OneRunDirError(RuntimeError):
    """The ranks of one distributed run resolved different run directories."""


class OneRunDir(L.Callback):
    """Check at setup that every rank writes into the same run directory; raise on all ranks if not.

    Processes that torchrun or srun start each run Hydra themselves and each resolve ``${now:...}`` in
    ``hydra.run.dir``; Lightning's own launcher passes rank 0's directory on.
    """

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


class HParamsSummary(L.Callback):
    """At the end of training, the config (shown flat: ``model/clip_value`` ...) and the final value of every
    metric in ``trainer.callback_metrics`` as ``final/<name>`` in TensorBoard's HParams view, so a sweep
    compares in one table."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_train_end(self, trainer: L.Trainer, pl_module: WGAN) -> None:
        metrics = {f"final/{k}": float(v) for k, v in trainer.callback_metrics.items()}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # rank 0 only: log_hyperparams is rank_zero_only
                logger.log_hyperparams(self.config, metrics=metrics, step=pl_module.gen_step)
