"""Checkpoint files: written atomically, and checked before they are used.

- :class:`AtomicCheckpointIO` is the Trainer's checkpoint plugin, so *every* checkpoint write
  (ModelCheckpoint, ``last.ckpt`` of LastCheckpoint) goes to a temporary file in the
  same folder, is flushed and fsync'ed, then renamed over the target. A process killed mid-write leaves
  the old file intact and at most a stray ``*.tmp-<pid>`` file, never a truncated ``last.ckpt``.
  That write is :func:`atomic_write`, the one every file written whole goes through (samples, caches).
- :func:`read_checkpoint` opens a file given for resume or generation and turns every way it can be wrong
  (missing, a folder, truncated, not a checkpoint, not this project's) into one :class:`CheckpointError`
  naming the file; :func:`check_resumable` also checks that its weights and optimizer state fit the model the
  config builds, and names the settings that differ when they do not.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from wgan_lit.config import RUNTIME_KEYS, DataConfig, LoggerConfig, ModelConfig


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and what to do."""


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write ``path`` all or nothing: yields a temporary path beside it to write (by name, so a memory map or
    a zip archive fits as well as a stream); when the block ends without an error, that file is fsync'ed and
    renamed over ``path``, then the folder is fsync'ed. On an error the temporary file is removed and ``path``
    is left as it was. The name ``<name>.tmp-<pid>`` is what :func:`remove_stale_temporaries` looks for."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        _fsync(os.open(tmp, os.O_RDWR))  # the writer has closed it; Windows fsyncs only a writable handle
        os.replace(tmp, path)  # atomic on POSIX and Windows when both are on one file system
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the rename itself durable across a power cut
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # not possible on every OS (e.g. Windows); the rename is still atomic
        return
    _fsync(fd)


def _fsync(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """torch.save to ``path`` through :func:`atomic_write`: all or nothing."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``*.tmp-<pid>`` files in ``folder`` whose writer is gone (killed mid-write, e.g. kill -9);
    a live process's file is kept. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob("*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with local writes made atomic and durable (see module docstring).

    Lightning 2.6's own ``_atomic_save`` stages the file through fsspec's ``tempfile.mkstemp()`` in /tmp and
    ``shutil.move``s it (read in fsspec 2026.9's LocalFileOpener): a copy, not a rename, when /tmp is another
    file system (a tmpfs, say), and never fsync'ed.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
        atomic_torch_save(checkpoint, path)


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a wgan_lit checkpoint on the CPU, or raise CheckpointError saying what is wrong with the file."""
    path = Path(path)
    hint = ("Pass a .ckpt file from a run's checkpoints/ folder, "
            "e.g. outputs/<date>/<time>/checkpoints/last.ckpt")
    if not path.exists():
        raise CheckpointError(f"{what} {path}: no such file. {hint}")
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: is a folder, not a file. {hint}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path}: the file is empty (a write that never finished?). {hint}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(f"{what} {path}: not a PyTorch checkpoint (a .ckpt file is a zip archive; this "
                              f"file starts with {magic!r}). {hint}")
    try:
        # weights_only, as Lightning loads it for resume: a file that fails here would fail there.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{what} {path}: holds Python objects other than tensors and plain containers, so it was not "
            f"written by wgan_lit ({str(err).splitlines()[-1][:200]}). {hint}") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(
            f"{what} {path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"the file is truncated or corrupt. {hint}"
        ) from err
    missing = [k for k in ("state_dict", "hyper_parameters") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{what} {path}: a PyTorch file but not a wgan_lit training checkpoint "
            f"(no {' or '.join(missing)}). {hint}"
        )
    if "generator.net.0.weight" not in ckpt["state_dict"]:
        raise CheckpointError(f"{what} {path}: a Lightning checkpoint of another model (no WGAN generator "
                              f"weights). {hint}")
    return ckpt


def config_key(hparam: str) -> str:
    """The config key behind a WGAN hyperparameter, e.g. ``n_extra_layers`` -> ``model.n_extra_layers``."""
    if hparam == "channels":
        return "channels (set by data.name)"
    for prefix, schema in (("model", ModelConfig), ("data", DataConfig), ("logger", LoggerConfig)):
        if hparam in {f.name for f in dataclasses.fields(schema)}:
            return f"{prefix}.{hparam}"
    return hparam


def architecture_mismatch(ckpt: dict[str, Any], model: L.LightningModule) -> list[str]:
    """Why ``ckpt`` cannot resume into ``model``; empty when it can.

    It can when its weights have the names and shapes of ``model.state_dict()`` and its optimizer states are of
    the optimizer ``model`` makes (the kind is not in the saved state: torch loads Adam's into RMSprop and fails
    at the first step, so it is read from the hyperparameters). When it cannot, every differing hyperparameter
    that changes the weights by itself is named, as ``config key: checkpoint has A, the config gives B``:
    those are the settings to change back.
    """
    def shapes(state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}

    saved_shapes, wanted_shapes = shapes(ckpt["state_dict"]), shapes(model.state_dict())
    # Without the runtime switches older checkpoints kept as hyperparameters: they never decide whether one fits.
    saved = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in RUNTIME_KEYS}
    wanted = dict(model.hparams)
    if saved_shapes == wanted_shapes and saved.get("optimizer") == wanted.get("optimizer"):
        return []
    keys = [k for k in [*wanted, *(k for k in saved if k not in wanted)] if saved.get(k) != wanted.get(k)]

    def alone_breaks(key: str) -> bool:  # the checkpoint's settings with only this one as the config gives it
        if key == "optimizer":
            return True
        try:
            with torch.device("meta"):
                other = type(model)(**{**saved, key: wanted[key]}) if key in wanted else None
        except Exception:  # noqa: BLE001 - a combination the model refuses: keep the key as a suspect
            return True
        return other is None or shapes(other.state_dict()) != saved_shapes
    # Name the settings that change the weights; a learning rate changed in the same command is no suspect.
    culprits = [k for k in keys if alone_breaks(k)] or keys
    if culprits:
        return [f"{config_key(k)}: checkpoint has {saved.get(k)!r}, the config gives {wanted.get(k)!r}"
                for k in culprits]
    # Same settings, other weights: written by a version of wgan_lit whose networks were built differently.
    name = min(k for k in saved_shapes.keys() | wanted_shapes.keys() if saved_shapes.get(k) != wanted_shapes.get(k))
    return [f"{name}: checkpoint has {saved_shapes.get(name, 'no such weight')}, the networks of the config have "
            f"{wanted_shapes.get(name, 'no such weight')} with the same settings (another version of wgan_lit?)"]


def check_resumable(path: str | Path, model: L.LightningModule) -> dict[str, Any]:
    """Read ``path`` for ``trainer.fit(model, ckpt_path=...)`` and check that it loads into ``model`` (which may
    be on the meta device: only names and shapes are compared)."""
    ckpt = read_checkpoint(path, what="ckpt_path")
    bad = architecture_mismatch(ckpt, model)
    if bad:
        raise CheckpointError(
            f"ckpt_path {path}: the checkpoint does not fit the networks and optimizer of the config ("
            + "; ".join(bad) + "). Resume with the settings the run was started with (its .hydra/config.yaml "
            "lists them)."
        )
    return ckpt
