"""A run's hyperparameters and final metrics in TensorBoard's HParams view, so a sweep compares in one table."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from wgan_lit.module import WGAN


class HParamsSummary(L.Callback):
    """At the end of training, write ``config`` (nested dict, shown flat as ``model/clip_value`` ...) with the
    final value of every metric in ``trainer.callback_metrics`` as ``final/<name>``.

    Metrics come from ``self.log(...)`` in the module or any callback: ``gen_step``, the Wasserstein estimate ``W``
    and ``g_loss`` at the last log point, and anything logged later (a sample-quality metric such as FID logged as
    ``self.log("fid", value)`` shows up as ``final/fid`` with no change here).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {f"final/{k}": float(v) for k, v in trainer.callback_metrics.items()}
        step = pl_module.gen_step if isinstance(pl_module, WGAN) else trainer.global_step  # x axis of the curves
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # rank 0 only: log_hyperparams is rank_zero_only
                logger.log_hyperparams(self.config, metrics=metrics, step=step)
