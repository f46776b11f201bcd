"""Lightning callbacks that count in generator steps: sample grids and the run-length limit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image

from wgan_lit.module import WGAN


class SampleGrid(L.Callback):
    """Every ``every_n_gen_steps`` generator steps, render the fixed noise batch as one grid.

    The grid goes to TensorBoard (tag ``samples``, x axis = generator steps) and to
    ``<dirpath>/gen_XXXXXX.png``. Sampling runs BatchNorm in inference mode and draws no random numbers,
    so it never changes the course of training.
    """

    def __init__(self, dirpath: str | Path, every_n_gen_steps: int = 100) -> None:
        self.dirpath = Path(dirpath)
        self.every = every_n_gen_steps
        self._last_step = -1

    def _render(self, trainer: L.Trainer, module: WGAN) -> None:
        step = module.gen_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        images = module.generate(module.fixed_noise).float()
        nrow = max(1, int(len(images) ** 0.5))
        grid = make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        save_image(grid, self.dirpath / f"gen_{step:06d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid.clamp(0, 1).cpu(), global_step=step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._render(trainer, pl_module)  # the untrained generator: the first frame of the timelapse

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if pl_module.gen_step % self.every == 0:
            self._render(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._render(trainer, pl_module)


class GeneratorStepLimit(L.Callback):
    """Stop after ``max_gen_steps`` generator updates (Lightning's max_steps counts critic steps too)."""

    def __init__(self, max_gen_steps: int) -> None:
        self.max_gen_steps = max_gen_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if pl_module.gen_step >= self.max_gen_steps:
            trainer.should_stop = True
