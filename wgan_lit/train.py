"""Train a WGAN: ``python -m wgan_lit.train [group=option ...] [key=value ...]``. Hydra composes conf/train.yaml;
everything a run writes goes to its run directory, ``outputs/<date>/<time>/`` unless ``hydra.run.dir`` says."""

import dataclasses
import logging
import math
import os
import re
import shlex
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, read_write

from wgan_lit import checkpointing, cli, fast_path
from wgan_lit.callbacks import OneRunDirError, build_callbacks
from wgan_lit.classifier import ClassifierError
from wgan_lit.config import ConfigError, DataError, TrainConfig, register_configs, validate
from wgan_lit.data import build_datamodule
from wgan_lit.losses import LOSSES
from wgan_lit.module import WGAN, DivergenceError

BAD_INPUT = (ConfigError, DataError, checkpointing.CheckpointError, OneRunDirError, ClassifierError)  # exit 2

log = logging.getLogger("wgan_lit.train")  # not __name__: "__main__" under python -m

class WandbRun(WandbLogger):
    """Lightning's WandbLogger, which also ends its run: the next one in this process (a sweep job) would log to it."""

    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None:
            self._experiment.finish(exit_code=int(status != "success"))


def build_logger(cfg: TrainConfig, run_dir: Path) -> Logger:  # one branch per logger.name
    c = cfg.logger
    if c.name == "tensorboard":
        return TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False)
    if c.name == "mlflow" and c.tracking_uri:
        return MLFlowLogger(c.experiment, tracking_uri=c.tracking_uri)
    if c.name == "mlflow":  # by default a sqlite store in the run dir: MLflow 3 refuses a directory of files
        (store := Path(run_dir).resolve() / "mlflow").mkdir(parents=True, exist_ok=True)
        return MLFlowLogger(c.experiment, tracking_uri=f"sqlite:///{store / 'mlflow.db'}",
                            artifact_location=(store / "artifacts").as_uri())
    if c.name == "wandb":
        return WandbRun(project=c.experiment, save_dir=run_dir, offline=not c.online)
    return CSVLogger(run_dir, name="csv", version="")


def build_model(cfg: TrainConfig, datamodule: L.LightningDataModule) -> WGAN:  # runtime: not hyperparameters
    return WGAN(image_size=cfg.data.image_size, channels=datamodule.channels,
                log_every_n_gen_steps=cfg.logger.log_every_n_gen_steps, cpu_threads=cfg.cpu_threads,
                **dataclasses.asdict(cfg.runtime), **dataclasses.asdict(cfg.model))


def check_before_run(cfg: DictConfig) -> TrainConfig:
    """What can fail before training, checked without writing: the values, the data, the checkpoint to resume."""
    config = validate(cfg)
    datamodule = build_datamodule(config.data)
    datamodule.prepare_data()
    if config.ckpt_path:
        with torch.device("meta"):  # only names and shapes are compared: no memory, no initialisation
            checkpointing.check_resumable(config.ckpt_path, build_model(config, datamodule))
    return config


def train(cfg: TrainConfig, run_dir: str | Path, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    """Fit one WGAN as configured, under ``run_dir``, with ``extra_callbacks`` too; returns the final metrics."""
    run_dir = Path(run_dir)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()  # missing or corrupt data fails before anything is written
    cfg = fast_path.resolve(cfg, datamodule.channels)  # the probe's choice; a resume: the checkpoint's
    if rank_zero_only.rank == 0:  # the runtime record, as checkpoints keep it (wgan_runtime)
        log.info("Runtime: trainer.precision=%s cpu_threads=%d %s", cfg.trainer.get("precision") or "32-true",
                 cfg.cpu_threads, " ".join(f"runtime.{k}={v}" for k, v in dataclasses.asdict(cfg.runtime).items()))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    model = build_model(cfg, datamodule)
    if cfg.ckpt_path:  # a missing, corrupt or mismatched checkpoint fails here, before training starts
        checkpointing.check_resumable(cfg.ckpt_path, model)
    trainer = L.Trainer(**{k: v for k, v in cfg.trainer.items() if k not in ("max_time", "enable_progress_bar")},
                        enable_progress_bar=False,  # both are callbacks of ours
                        logger=build_logger(cfg, run_dir), default_root_dir=run_dir,
                        plugins=[checkpointing.AtomicCheckpointIO()],
                        callbacks=build_callbacks(cfg, run_dir, datamodule, extra_callbacks))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path or None)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def objective_value(cfg: TrainConfig, metrics: dict[str, float]) -> tuple[str, float | None]:
    """(name, final value) of ``cfg.objective`` in train()'s metrics; one the run did not compute (metrics off) falls
    back to the loss's critic estimate (W); None (a failed trial) when that is missing or NaN too."""
    name = f"metrics/{cfg.objective}" if f"metrics/{cfg.objective}" in metrics else LOSSES[cfg.model.loss].short
    return name, None if math.isnan(value := metrics.get(name, math.nan)) else value


def resume_note(run_dir: str | Path, saved: str, unsaved: str) -> str:
    """``saved`` with the run's last.ckpt as {last}, its {step} and the {command} resuming it; else ``unsaved``."""
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    if not last.is_file():
        return unsaved
    step = torch.load(last, map_location="cpu", weights_only=True)["wgan_counters"]["gen_step"]
    overrides = [o for o in HydraConfig.get().overrides.task
                 if o.split("=", 1)[0].lstrip("+~") not in ("ckpt_path", "hydra.run.dir")]
    line = shlex.join(["python", "-m", "wgan_lit.train", *overrides, f"ckpt_path={last}", f"hydra.run.dir={run_dir}"])
    return saved.format(last=last, step=step, command=line)


def lost_process_reason(err: BaseException) -> str | None:
    """gloo's words in a collective's RuntimeError once another process of the run is gone, if ``err`` is that."""
    words = [w for w in ("connection reset by peer", "connection closed by peer") if w in str(err).lower()]
    return f"torch.distributed: {words[0]}" if words and isinstance(err, RuntimeError) else None


class LostProcessReport(logging.Filter):
    """Says once that a process of the run died, whoever learns it first: ``_main``, from a collective's error, or
    (as a filter of its log line) Lightning's launcher on rank 0, which SIGKILLs this process right after."""

    LAUNCHER_LOG = "lightning.fabric.strategies.launchers.subprocess_script"

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.run_dir, self.said, self._lock = run_dir, False, threading.Lock()

    def say(self, reason: str) -> None:
        with self._lock:  # the launcher's thread and the main one
            if not self.said:
                self.said = True
                log.error(f"Error: a process of this distributed run died ({reason}); the run stopped.\n" + resume_note(
                    self.run_dir, "Last checkpoint: {last} (generator step {step}). Resume with:\n  {command}",
                    "No checkpoint had been written yet; nothing to resume."))

    def filter(self, record: logging.LogRecord) -> bool:
        killed = re.search(r"Child process with PID \d+ terminated with code -(\d+)", record.getMessage())
        if killed:  # not a child that exited with an error: that one said so itself
            self.say(f"a child process was killed by signal {killed[1]}")
        return killed is None  # said instead


@contextmanager
def ddp_job() -> Iterator[None]:
    """One Hydra job that may start DDP: under ``-m`` ranks > 0 re-run this job alone, in its directory; it leaves
    no process group or environment variables (the launcher's MASTER_PORT, ...) to the next job of a sweep."""
    if HydraConfig.initialized() and (hydra_cfg := HydraConfig.get()).mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]  # this job's values, without -m
        with read_write(hydra_cfg):  # Lightning passes hydra.run.dir=<run.dir> on: the job's subdirectory
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    env_before = dict(os.environ)
    had_group = dist.is_available() and dist.is_initialized()  # a group from before this job is not ours
    try:
        yield
    finally:
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key in os.environ.keys() - env_before.keys():
            del os.environ[key]
        os.environ.update(env_before)


class SweepJobError(CompactHydraException):
    """A ``-m`` job that cannot train fails alone: Hydra prints this line (no traceback) after the sweep, exit 1."""


def _optuna_trial() -> bool:
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and hydra_cfg.sweeper._target_.endswith(".OptunaSweeper")


def _job_failed(message: str, exit_code: int) -> None:
    """Say ``Error: message``; an Optuna trial returns None, a failed trial (with optuna 2.10 and hydra-optuna-sweeper
    1.3, NaN ends the sweep), another sweep job raises (a SystemExit would end the whole sweep), a single run exits."""
    log.error("Error: %s", message)
    if _optuna_trial():
        return None
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise SweepJobError(f"Error: {message}")
    sys.exit(exit_code)


register_configs()


@hydra.main(version_base="1.3", config_path=cli.CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    _log_to_the_run()
    run_dir = HydraConfig.get().runtime.output_dir
    lost, launcher_log = LostProcessReport(run_dir), logging.getLogger(LostProcessReport.LAUNCHER_LOG)
    launcher_log.addFilter(lost)
    try:
        checked = validate(cfg)  # a single run was checked whole by main(); a sweep job is checked as it starts
        log.info("Config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
        with ddp_job():
            metrics = train(checked, run_dir)
    except BAD_INPUT as err:
        return _job_failed(str(err), 2)
    except SIGTERMException as stop:  # Ctrl-C or SIGTERM: LastCheckpoint saved the batch it stopped at
        if rank_zero_only.rank == 0:  # every DDP rank stops here; one says how to go on
            log.warning(resume_note(run_dir, "Interrupted: saved {last} at generator step {step}.\nResume with:\n"
                                    "  {command}", "Interrupted before any checkpoint was written; nothing to resume."))
        sys.exit(stop.code)
    except DivergenceError as err:
        return _job_failed(f"{err}\n" + resume_note(run_dir, "Last good checkpoint: {last} (generator step {step}). "
                                                    "To go on from it:\n  {command} model.lr_d=... model.lr_g=...",
                                                    "No checkpoint had been written yet."), 1)
    except Exception as err:
        if reason := lost_process_reason(err):
            lost.say(reason)  # by every process left: the dead one may be rank 0
            sys.exit(1)
        if not _optuna_trial():
            raise
        return _job_failed(f"{type(err).__name__}: {err}", 1)  # any other failure of a trial: a failed trial
    finally:
        if not lost.said:  # once said, it keeps the launcher's line of the same death out until the exit
            launcher_log.removeFilter(lost)
    log.info("Run directory: %s", run_dir)
    name, value = objective_value(checked, metrics)
    log.info("Objective (minimised): %s=%r", name, value)
    return value  # the task's return value: what hydra/sweeper=optuna minimises


def _log_to_the_run() -> None:
    """Lightning's messages (it gave its loggers handlers of their own) and warnings to the console and train.log."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torchmetrics"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.captureWarnings(True)


def main() -> None:
    """``python -m wgan_lit.train``: a single run is checked whole before Hydra runs; sweep jobs as they start."""
    cli.check_train_command_line(sys.argv[1:], check_before_run, BAD_INPUT)
    _main()


if __name__ == "__main__":
    main()
