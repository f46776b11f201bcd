"""Train a WGAN: ``python -m wgan_lit.train [group=option ...] [key=value ...]``.

Hydra composes ``conf/train.yaml`` with the ``model``, ``data``, ``trainer``, ``logger`` and ``experiment``
groups; everything a run writes (TensorBoard logs, sample grids, checkpoints, the resolved config) goes to
Hydra's run directory, ``outputs/<date>/<time>/`` unless ``hydra.run.dir`` says otherwise.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from wgan_lit.callbacks import GeneratorStepLimit, SampleGrid
from wgan_lit.classifier import ClassifierError
from wgan_lit.config import ConfigError, DataConfig, TrainConfig, register_configs, validate
from wgan_lit.data import DataError, FashionMNISTDataModule
from wgan_lit.metrics import sample_quality_callbacks
from wgan_lit.module import WGAN

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def build_datamodule(cfg: DataConfig) -> L.LightningDataModule:
    if cfg.name == "fashion_mnist":
        return FashionMNISTDataModule(
            root=cfg.root, batch_size=cfg.batch_size, image_size=cfg.image_size,
            num_workers=cfg.num_workers, download=cfg.download, split=cfg.split,
        )
    raise ConfigError(f"data.name={cfg.name!r} has no data module")


def build_logger(cfg: TrainConfig, run_dir: Path) -> Logger:
    if cfg.logger.name == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name="tensorboard", version="", default_hp_metric=False)
    return CSVLogger(save_dir=run_dir, name="csv", version="")


def train(cfg: TrainConfig, run_dir: str | Path) -> dict[str, float]:
    """Fit one WGAN as configured; everything goes under ``run_dir``. Returns the final logged metrics."""
    run_dir = Path(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    datamodule.prepare_data()  # fail on missing or corrupt data before anything is written

    model = WGAN(
        image_size=cfg.data.image_size,
        channels=datamodule.channels,
        log_every_n_gen_steps=cfg.logger.log_every_n_gen_steps,
        **dataclasses.asdict(cfg.model),
    )
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="epoch{epoch:03d}-gen{gen_step:.0f}",
            auto_insert_metric_name=False,
            every_n_epochs=cfg.checkpoint_every_n_epochs,
            save_top_k=-1,  # periodic: keep every one
            save_last=True,
        ),
    ]
    if cfg.logger.sample_every_n_gen_steps > 0:
        callbacks.append(SampleGrid(run_dir / "samples", cfg.logger.sample_every_n_gen_steps))
    if cfg.max_gen_steps > 0:
        callbacks.append(GeneratorStepLimit(cfg.max_gen_steps))
    # After GeneratorStepLimit: the last scoring sees its should_stop and scores the final model.
    callbacks += sample_quality_callbacks(cfg.metrics, cfg.data, run_dir / "checkpoints", datamodule)

    trainer = L.Trainer(
        **dataclasses.asdict(cfg.trainer),
        logger=build_logger(cfg, run_dir),
        callbacks=callbacks,
        default_root_dir=run_dir,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,  # the module logs on its own generator-step schedule
    )
    trainer.fit(model, datamodule=datamodule)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


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
        metrics = train(config, run_dir)
    except (DataError, ClassifierError) as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"Run directory: {run_dir}")
    return metrics.get("W")


if __name__ == "__main__":
    main()
