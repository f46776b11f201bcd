"""Train a WGAN: ``python -m wgan_lit.train [group=option ...] [key=value ...]``.

Hydra composes ``conf/train.yaml`` with the ``model``, ``data``, ``trainer``, ``logger`` and ``experiment``
groups; everything a run writes (TensorBoard logs, sample grids, checkpoints, the resolved config) goes to
Hydra's run directory, ``outputs/<date>/<time>/`` unless ``hydra.run.dir`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from wgan_lit.callbacks import GeneratorStepLimit, SampleGrid
from wgan_lit.checkpointing import AtomicCheckpointIO, CheckpointError, LastCheckpoint, check_resumable
from wgan_lit.classifier import ClassifierError
from wgan_lit.config import ConfigError, DataConfig, TrainConfig, register_configs, validate
from wgan_lit.data import DataError, FashionMNISTDataModule
from wgan_lit.distributed import NoisePerRank, OneRunDir, OneRunDirError, ddp_job
from wgan_lit.guards import DivergenceGuard, GracefulStop
from wgan_lit.hparams import HParamsSummary
from wgan_lit.images import CelebADataModule, ImageFolderDataModule
from wgan_lit.metrics import sample_quality_callbacks
from wgan_lit.module import WGAN, DivergenceError
from wgan_lit.resume import ExactResume
from wgan_lit.timelapse import Timelapse

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def build_datamodule(cfg: DataConfig) -> L.LightningDataModule:
    if cfg.name == "fashion_mnist":
        return FashionMNISTDataModule(
            root=cfg.root, batch_size=cfg.batch_size, image_size=cfg.image_size,
            num_workers=cfg.num_workers, download=cfg.download, split=cfg.split,
            device_resident=cfg.device_resident,
        )
    if cfg.name in ("celeba", "folder"):
        images = CelebADataModule if cfg.name == "celeba" else ImageFolderDataModule
        return images(
            root=cfg.root, batch_size=cfg.batch_size, image_size=cfg.image_size, num_workers=cfg.num_workers,
            split=cfg.split, center_crop=cfg.center_crop, cache_dir=cfg.cache_dir,
            device_resident=cfg.device_resident,
        )
    raise ConfigError(f"data.name={cfg.name!r} has no data module")


def build_logger(cfg: TrainConfig, run_dir: Path) -> Logger:
    if cfg.logger.name == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="", default_hp_metric=False)
    return CSVLogger(save_dir=run_dir, name="csv", version="")


def train(cfg: TrainConfig, run_dir: str | Path, extra_callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    """Fit one WGAN as configured; everything goes under ``run_dir``. Returns the final logged metrics.

    ``extra_callbacks`` join the run's own (for tests and notebooks that watch a run).
    """
    run_dir = Path(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.cpu_threads > 0:
        torch.set_num_threads(cfg.cpu_threads)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()  # fail on missing or corrupt data before anything is written

    model = WGAN(
        image_size=cfg.data.image_size,
        channels=datamodule.channels,
        log_every_n_gen_steps=cfg.logger.log_every_n_gen_steps,
        **dataclasses.asdict(cfg.model),
    )
    if cfg.ckpt_path:  # a missing, corrupt or mismatched checkpoint fails here, before training starts
        check_resumable(cfg.ckpt_path, dict(model.hparams))
    ckpt_dir = run_dir / "checkpoints"
    callbacks: list[L.Callback] = [
        ExactResume(),  # first: it records the data position before any checkpoint of this batch is written
        OneRunDir(run_dir),
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="epoch{epoch:03d}-gen{gen_step:.0f}",
            auto_insert_metric_name=False,
            every_n_epochs=cfg.checkpoint_every_n_epochs,
            save_top_k=-1,  # periodic: keep every one
            save_last=False,  # last.ckpt is LastCheckpoint's and GracefulStop's (wgan_lit/checkpointing.py)
            enable_version_counter=False,  # a resumed run re-saving an epoch file overwrites it
        ),
    ]
    if cfg.logger.sample_every_n_gen_steps > 0:
        callbacks.append(SampleGrid(run_dir / "samples", cfg.logger.sample_every_n_gen_steps))
    if cfg.max_gen_steps > 0:
        callbacks.append(GeneratorStepLimit(cfg.max_gen_steps))
    # After GeneratorStepLimit: the last scoring sees its should_stop and scores the final model.
    callbacks += sample_quality_callbacks(cfg.metrics, cfg.data, ckpt_dir, datamodule)
    callbacks += [  # Lightning runs LastCheckpoint last, so it saves at the batch where any callback stops the run
        LastCheckpoint(ckpt_dir, cfg.checkpoint_every_n_gen_steps),
        GracefulStop(ckpt_dir),
        DivergenceGuard(),
    ]
    if cfg.logger.timelapse and cfg.logger.sample_every_n_gen_steps > 0:
        callbacks.append(Timelapse(run_dir))  # after SampleGrid, whose last frame it needs
    callbacks.append(NoisePerRank(cfg.seed))  # after ExactResume, which restores RNG states at train start
    callbacks += extra_callbacks
    logger = build_logger(cfg, run_dir)
    if isinstance(logger, TensorBoardLogger):
        callbacks.append(HParamsSummary(dataclasses.asdict(cfg)))  # last: sees every metric logged at the end

    trainer = L.Trainer(
        **dataclasses.asdict(cfg.trainer),
        logger=logger,
        callbacks=callbacks,
        default_root_dir=run_dir,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # the module logs on its own generator-step schedule
        plugins=[AtomicCheckpointIO()],  # every checkpoint write is all-or-nothing
    )
    with warnings.catch_warnings():
        if hasattr(datamodule, "sampler"):  # a ResumableSampler: the data module restores its own position,
            # which Lightning cannot see (wgan_lit/resume.py), so its warning about mid-epoch resumes is wrong
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
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


register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        config = validate(cfg)
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    print(OmegaConf.to_yaml(cfg, resolve=True))
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        with ddp_job():  # DDP ranks > 0 re-run this job, not the whole sweep
            metrics = train(config, run_dir)
    except (DataError, CheckpointError, OneRunDirError, ClassifierError) as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException as stop:  # Ctrl-C or SIGTERM: GracefulStop saved a checkpoint
        print(interrupted_message(run_dir), file=sys.stderr)
        sys.exit(stop.code)
    except DivergenceError as err:
        print(f"Error: {err}\n{last_checkpoint_note(run_dir)}", file=sys.stderr)
        sys.exit(1)
    print(f"Run directory: {run_dir}")
    return metrics.get("W")


if __name__ == "__main__":
    main()
