"""Train a WGAN: ``python -m wgan_lit.train [group=option ...] [key=value ...]``.

Hydra composes ``conf/train.yaml`` with the ``model``, ``data``, ``trainer``, ``logger`` and ``experiment``
groups; everything a run writes (TensorBoard logs, sample grids, checkpoints, the resolved config) goes to
Hydra's run directory, ``outputs/<date>/<time>/`` unless ``hydra.run.dir`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import hydra
import lightning as L
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, read_write

from wgan_lit import cli, fast_path
from wgan_lit.callbacks import OneRunDirError, build_callbacks
from wgan_lit.checkpointing import AtomicCheckpointIO, CheckpointError, check_resumable
from wgan_lit.classifier import ClassifierError
from wgan_lit.config import ConfigError, DataError, TrainConfig, register_configs, validate
from wgan_lit.data import build_datamodule
from wgan_lit.module import WGAN, DivergenceError

log = logging.getLogger("wgan_lit.train")  # not __name__: "__main__" under python -m


def build_logger(cfg: TrainConfig, run_dir: Path) -> Logger:
    if cfg.logger.name == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="", default_hp_metric=False)
    return CSVLogger(save_dir=run_dir, name="csv", version="")


def build_model(cfg: TrainConfig, datamodule: L.LightningDataModule) -> WGAN:
    # The runtime switches are arguments of their own: the module keeps them out of the hyperparameters.
    return WGAN(image_size=cfg.data.image_size, channels=datamodule.channels,
                log_every_n_gen_steps=cfg.logger.log_every_n_gen_steps, cpu_threads=cfg.cpu_threads,
                **dataclasses.asdict(cfg.runtime), **dataclasses.asdict(cfg.model))


def check_before_run(cfg: DictConfig) -> TrainConfig:
    """Everything that can fail before training, checked without writing: config values, Trainer arguments, the
    data (found and read), the checkpoint to resume (readable, of these networks). For a single run, before Hydra
    makes its run directory; :func:`train` checks the data and the checkpoint again as it starts (a sweep job's
    only check of them), which costs a second read of the data for a single run."""
    config = validate(cfg)
    datamodule = build_datamodule(config.data)
    datamodule.prepare_data()
    if config.ckpt_path:
        with torch.device("meta"):  # only names and shapes are compared: no memory, no initialisation
            model = build_model(config, datamodule)
        check_resumable(config.ckpt_path, model)
    return config


def train(cfg: TrainConfig, run_dir: str | Path, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    """Fit one WGAN as configured; everything goes under ``run_dir``. Returns the final logged metrics.

    ``extra_callbacks`` join the run's own (for tests and notebooks that watch a run).
    """
    run_dir = Path(run_dir)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()  # fail on missing or corrupt data before anything is written (read once)
    # fast_path.probe: precision, threads, layout, compile; a resume: the checkpoint's
    cfg = fast_path.resolve(cfg, datamodule.channels)
    if rank_zero_only.rank == 0:  # what checkpoints record as wgan_runtime, said once
        log.info("Runtime: trainer.precision=%s cpu_threads=%d %s", cfg.trainer.get("precision") or "32-true",
                 cfg.cpu_threads, " ".join(f"runtime.{k}={v}" for k, v in dataclasses.asdict(cfg.runtime).items()))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)

    model = build_model(cfg, datamodule)
    if cfg.ckpt_path:  # a missing, corrupt or mismatched checkpoint fails here, before training starts
        check_resumable(cfg.ckpt_path, model)
    trainer = L.Trainer(
        **{k: v for k, v in cfg.trainer.items() if k != "max_time"},  # its Timer is among the callbacks
        logger=build_logger(cfg, run_dir),
        callbacks=build_callbacks(cfg, run_dir, datamodule, extra_callbacks),
        default_root_dir=run_dir,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path or None)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def resume_command(run_dir: str | Path, ckpt: str | Path) -> str:
    """The command line that continues this run: its own overrides, then the checkpoint and the run dir."""
    overrides = [o for o in HydraConfig.get().overrides.task
                 if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")]
    return " ".join(["python -m wgan_lit.train", *map(shlex.quote, overrides),
                     shlex.quote(f"ckpt_path={ckpt}"), shlex.quote(f"hydra.run.dir={run_dir}")])


def _last_checkpoint(run_dir: str | Path) -> tuple[Path, int] | None:
    """The run's last.ckpt and its generator step, if it has one."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return None
    return last, torch.load(last, map_location="cpu", weights_only=True)["wgan_counters"]["gen_step"]


def interrupted_message(run_dir: str | Path) -> str:
    if (found := _last_checkpoint(run_dir)) is None:
        return "Interrupted before any checkpoint was written; nothing to resume."
    last, step = found
    return (f"Interrupted: saved {last} at generator step {step}.\n"
            f"Resume with:\n  {resume_command(run_dir, last)}")


def last_checkpoint_note(run_dir: str | Path) -> str:
    if (found := _last_checkpoint(run_dir)) is None:
        return "No checkpoint had been written yet."
    last, step = found
    return (f"Last good checkpoint: {last} (generator step {step}). To go on from it:\n  "
            f"{resume_command(run_dir, last)} model.lr_d=... model.lr_g=...")


# What torch.distributed raises in a collective (the all-reduce of a DDP backward, a barrier, a gather) once another
# process of the run is gone: gloo's RuntimeError for the socket the dead process's kernel closed.
_PEER_GONE = ("connection reset by peer", "connection closed by peer")


def lost_process_reason(err: BaseException) -> str | None:
    """torch.distributed's words for a process of the run that died, if ``err`` is that error."""
    if not isinstance(err, RuntimeError):
        return None
    return next((f"torch.distributed: {words}" for words in _PEER_GONE if words in str(err).lower()), None)


def lost_process_message(run_dir: str | Path, reason: str) -> str:
    head = f"Error: a process of this distributed run died ({reason}); the run stopped."
    if (found := _last_checkpoint(run_dir)) is None:
        return f"{head}\nNo checkpoint had been written yet; nothing to resume."
    last, step = found
    return f"{head}\nLast checkpoint: {last} (generator step {step}). Resume with:\n  {resume_command(run_dir, last)}"


class LostProcessReport(logging.Filter):
    """Says :func:`lost_process_message` once, whoever learns of the death first: ``_main``, from the error of a
    collective, or Lightning's launcher on rank 0. The launcher polls its child processes every 5 s and, finding
    one killed, logs a line and then SIGKILLs this process, which can be before the error has reached ``_main``;
    as a filter of that line, this says the message first, in its place."""

    LAUNCHER_LOG = "lightning.fabric.strategies.launchers.subprocess_script"

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.run_dir, self.said, self._lock = run_dir, False, threading.Lock()

    def say(self, reason: str) -> None:
        with self._lock:  # the launcher's thread waits for this one's message, and the other way round
            if not self.said:
                log.error(lost_process_message(self.run_dir, reason))
                self.said = True

    def filter(self, record: logging.LogRecord) -> bool:
        killed = re.search(r"Child process with PID \d+ terminated with code -(\d+)", record.getMessage())
        if killed is None:  # a child that exited with an error said so itself
            return True
        self.say(f"a child process was killed by signal {killed[1]}")
        return False  # said instead


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


class SweepJobError(CompactHydraException):
    """A job of a ``-m`` sweep that cannot train (a bad value, missing data, a divergence): it fails alone and the
    sweep goes on. Hydra marks its ``JobReturn`` FAILED and, once every job of the sweep has run, prints this one
    line after "Error executing job with overrides: [...]" (no traceback: a CompactHydraException) and exits 1."""


def _job_failed(message: str, exit_code: int) -> NoReturn:
    """Say ``Error: message`` and end this job: a single run exits with ``exit_code``; a sweep job raises, because
    a SystemExit would end the whole sweep (Hydra's launcher catches Exception only)."""
    log.error("Error: %s", message)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise SweepJobError(f"Error: {message}")
    sys.exit(exit_code)


register_configs()


@hydra.main(version_base="1.3", config_path=cli.CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    _log_to_the_run()
    try:  # a single run was checked whole by main(); a sweep job is checked here, as it starts
        config = validate(cfg)
    except ConfigError as err:
        _job_failed(str(err), 2)
    log.info("Config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
    run_dir = HydraConfig.get().runtime.output_dir
    lost = LostProcessReport(run_dir)
    launcher_log = logging.getLogger(LostProcessReport.LAUNCHER_LOG)
    launcher_log.addFilter(lost)
    try:
        with ddp_job():  # DDP ranks > 0 re-run this job, not the whole sweep
            metrics = train(config, run_dir)
    except (DataError, CheckpointError, OneRunDirError, ClassifierError) as err:
        _job_failed(str(err), 2)
    except SIGTERMException as stop:  # Ctrl-C or SIGTERM: LastCheckpoint saved the batch it stopped at
        if rank_zero_only.rank == 0:  # every DDP rank stops here; one says how to go on
            log.warning(interrupted_message(run_dir))
        sys.exit(stop.code)
    except DivergenceError as err:
        _job_failed(f"{err}\n{last_checkpoint_note(run_dir)}", 1)
    except RuntimeError as err:
        if (reason := lost_process_reason(err)) is None:
            raise
        lost.say(reason)  # by every process left: the dead one may be rank 0
        sys.exit(1)
    finally:
        if not lost.said:  # once said, it keeps the launcher's line of the same death out until the exit
            launcher_log.removeFilter(lost)
    log.info("Run directory: %s", run_dir)
    return metrics.get("W")


def _log_to_the_run() -> None:
    """Lightning's messages and Python warnings through Hydra's handlers: the console and <run>/train.log.
    (Lightning gives its loggers a console handler of their own when imported, before Hydra sets logging up.)"""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics"):
        lightning = logging.getLogger(name)
        for handler in list(lightning.handlers):
            lightning.removeHandler(handler)
        lightning.propagate = True
    logging.captureWarnings(True)


def main() -> None:
    """``python -m wgan_lit.train``: the command line is checked before Hydra runs (a single run whole, a sweep's
    composition); each job of a sweep checks its values as it starts."""
    cli.check_train_command_line(sys.argv[1:], check_before_run, (ConfigError, DataError, CheckpointError))
    _main()


if __name__ == "__main__":
    main()
