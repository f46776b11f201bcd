"""Stopping a run without losing it: on Ctrl-C or SIGTERM, and on a NaN or inf loss.

:class:`GracefulStop` turns the first Ctrl-C (SIGINT) or SIGTERM during training into a request: the batch in
progress finishes, ``last.ckpt`` is written (atomically) at that batch boundary, and the run stops with a
:class:`~lightning.pytorch.utilities.exceptions.SIGTERMException` that ``wgan_lit.train.main`` turns into a
message with the exact resume command. A second Ctrl-C stops at once without saving. Under DDP, where the
signal may reach only some ranks, Lightning's own SIGTERM handling (which broadcasts it) raises the same
exception on every rank and the checkpoint is written from ``on_exception``.

:class:`DivergenceGuard` asks the module, before every checkpoint write, whether all losses so far and all
weights are finite, so a diverged run never overwrites a good checkpoint; the module itself stops the run at
the first log point after a NaN/inf loss (see ``WGAN.check_finite``).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from wgan_lit.module import WGAN


class GracefulStop(L.Callback):
    """First Ctrl-C/SIGTERM: finish the batch, save ``<dirpath>/last.ckpt``, stop. Second Ctrl-C: stop now."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.received: int | None = None  # the signal that asked for the stop
        self.saved: Path | None = None  # where the checkpoint went
        self.gen_step: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists: no checkpoint
        self.received = signum
        rank_zero_info(f"\n{signal.Signals(signum).name} received: finishing this batch, saving a "
                       "checkpoint, then stopping (Ctrl-C again to stop at once without saving).")

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def _uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:  # see the module docstring for DDP
            self._install()

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved is None:
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved, self.gen_step = self.path, getattr(pl_module, "gen_step", None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if self.received is None:
            return
        self._save(trainer, pl_module)
        raise SIGTERMException(128 + self.received)  # Lightning's way out of fit(); our handler in train.main

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule,
                     exception: BaseException) -> None:
        self._uninstall()
        if isinstance(exception, SIGTERMException):
            if self.received is None:  # Lightning's own SIGTERM path (DDP): it stops at a batch boundary too
                self.received = signal.SIGTERM
            self._save(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()


class DivergenceGuard(L.Callback):
    """Refuse to write any checkpoint once a loss or a weight is NaN/inf; the good files on disk stay."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if isinstance(pl_module, WGAN):
            pl_module.check_finite()  # raises DivergenceError before the file is opened
