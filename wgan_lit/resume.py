"""Exact resume: the data order, the position in it and the random number generators survive a checkpoint.

Lightning restores the weights, optimizer states, loop counters and the module's own counters
(``wgan_counters``). Two things it leaves to the user are kept here:

- the data order and position: :class:`ResumableSampler` shuffles with its own seeded generator (pass ``k``
  of the data is ``randperm(n)`` seeded by ``(seed, k)``), so the order is a function of the checkpoint and
  not of the global RNG; the data module saves the sampler's state (its ``state_dict``) and
  :class:`ExactResume` tells it, after every training batch, how many images training has used. A resumed
  run continues the pass where it stopped instead of starting a new shuffle.
- the global RNG states (torch CPU and CUDA, numpy, Python) that draw the noise batches: saved with each
  checkpoint and put back when training restarts.

Under DDP Lightning wraps the sampler in a ``DistributedSamplerWrapper`` and the position is not restored
(a resumed DDP run repeats the interrupted pass from its start); weights, optimizers and counters still are.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Random order over ``n`` items whose state (seed, pass, images used) can be saved and restored.

    Each ``iter()`` starts the next pass with a fresh permutation, except the first one after
    :meth:`load_state_dict` of an unfinished pass, which continues it after the images already used.
    """

    def __init__(self, n: int, seed: int | None = None) -> None:
        self.n = n
        # Drawn from the global RNG when not given, so `seed_everything` fixes it; saved with the state.
        self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if seed is None else seed
        self.pass_index = -1  # the pass being served; -1 before the first
        self.used = 0  # images of that pass that training has consumed
        self.finished = True  # the pass is over: the next iter() starts a new one
        self._pending_skip: int | None = None  # set by load_state_dict: continue this pass from here

    def permutation(self, pass_index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 1_000_003 * pass_index)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self) -> Iterator[int]:
        if self._pending_skip is not None:
            start, self._pending_skip = self._pending_skip, None
        else:
            self.pass_index += 1
            self.used, self.finished, start = 0, False, 0
        yield from self.permutation(self.pass_index)[start:].tolist()

    def __len__(self) -> int:
        return self.n

    def advance(self, n_images: int, batch_size: int) -> None:
        """Training consumed ``n_images`` more; the pass is over once no full batch is left."""
        self.used += n_images
        if self.n - self.used < batch_size:
            self.finished = True

    def end_pass(self) -> None:
        """The epoch ended before the data did (``limit_train_batches``): next iter() starts a new pass."""
        self.finished = True

    def state_dict(self) -> dict[str, int | bool]:
        return {"seed": self.seed, "pass_index": self.pass_index, "used": self.used,
                "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.pass_index = int(state["seed"]), int(state["pass_index"])
        self.used, self.finished = int(state["used"]), bool(state["finished"])
        self._pending_skip = None if self.finished else self.used


def find_sampler(trainer: L.Trainer) -> ResumableSampler | None:
    """The training dataloader's ResumableSampler, or None (another sampler, or DDP's wrapper)."""
    loader = trainer.train_dataloader
    sampler = getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, ResumableSampler) else None


class ExactResume(L.Callback):
    """Saves the global RNG states with every checkpoint and restores them; counts the images trained on."""

    STATE_KEY = "rng_states"

    def __init__(self) -> None:
        self._rng_to_restore: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        sampler = find_sampler(trainer)
        if sampler is None:
            return
        batch_size = trainer.train_dataloader.batch_size
        sampler.advance(batch_size, batch_size)
        if batch_idx + 1 >= trainer.num_training_batches:
            sampler.end_pass()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        states = _collect_rng_states(include_cuda=torch.cuda.is_available())
        if "numpy" in states:  # a tensor instead of an ndarray, so torch.load(weights_only=True) accepts it
            name, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (name, torch.from_numpy(keys.copy()), int(pos), int(has_gauss), float(cached))
        checkpoint[self.STATE_KEY] = states

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get(self.STATE_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning restores the optimizers' learning rates from the checkpoint; the config's win, so a
        # resumed run can be given other rates (e.g. after a divergence). Unchanged config: the same rates.
        hp = pl_module.hparams
        if "lr_g" in hp and "lr_d" in hp and len(trainer.optimizers) == 2:
            # configure_optimizers' order: generator, critic
            for opt, lr in zip(trainer.optimizers, (hp.lr_g, hp.lr_d), strict=True):
                for group in opt.param_groups:
                    group["lr"] = lr
        # Here, after Lightning has built the dataloader and fetched the first batch, and before any noise is
        # drawn: the RNG then continues exactly where the checkpointed run left it.
        if self._rng_to_restore is None:
            return
        states = dict(self._rng_to_restore)
        cuda = states.pop("torch.cuda", None)
        if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
            states["torch.cuda"] = cuda
        elif cuda:
            rank_zero_warn("The checkpoint's CUDA RNG states do not fit this machine's GPUs; not restored.")
        if "numpy" in states:
            name, keys, pos, has_gauss, cached = states["numpy"]
            states["numpy"] = (name, keys.numpy(), pos, has_gauss, cached)
        _set_rng_states(states)
        self._rng_to_restore = None
