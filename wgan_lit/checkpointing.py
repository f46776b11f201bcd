"""Files written whole (the one atomic write) and checkpoints checked before they are used."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from wgan_lit.config import RUNTIME_KEYS, DataConfig, LoggerConfig, ModelConfig

CONFIG_KEYS = {"channels": "channels (set by data.name)", **{name: f"{prefix}.{name}" for prefix, schema in (
    ("logger", LoggerConfig), ("data", DataConfig), ("model", ModelConfig)) for name in schema.__dataclass_fields__}}
HINT = "Pass a .ckpt file from a run's checkpoints/ folder, e.g. outputs/<date>/<time>/checkpoints/last.ckpt"

class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and what to do."""

@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yields ``<path>.tmp-<pid>`` to write; renamed over ``path`` (fsync'ed) if the block succeeds, else removed."""
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # the writer has closed it; Windows fsyncs only a writable handle
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows within one file system
    finally:
        tmp.unlink(missing_ok=True)
    if os.name == "posix":  # the rename made durable across a power cut (Windows cannot open a folder)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)

def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``*.tmp-<pid>`` files in ``folder`` whose writer is gone (e.g. kill -9); keep a live one's."""
    removed = []
    for tmp in Path(folder).glob("*.tmp-*"):
        try:
            with suppress(PermissionError, ValueError):  # someone else's process, or no pid: kept
                os.kill(int(tmp.name.rsplit("-", 1)[-1]), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed

class AtomicCheckpointIO(TorchCheckpointIO):
    """Local writes via atomic_torch_save: Lightning 2.6 stages them in /tmp, then shutil.move (a copy, no fsync)."""
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)  # remote: fsspec's transaction
        atomic_torch_save(checkpoint, path)

def read_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Load a wgan_lit checkpoint on the CPU, or raise CheckpointError saying what is wrong with the file."""
    path, bad = Path(path), lambda why: CheckpointError(f"{what} {path}: {why}. {HINT}")
    if not path.is_file():
        raise bad("is a folder, not a file" if path.exists() else "no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive
        raise bad(f"not a PyTorch checkpoint (a .ckpt file is a zip archive; this file starts with {magic!r})"
                  if magic else "the file is empty (a write that never finished?)")
    try:  # weights_only, as Lightning loads it to resume: a file that fails here would fail there
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise bad("holds Python objects other than tensors and plain containers, so it was not written by "
                  f"wgan_lit ({str(err).splitlines()[-1][:200]})") from err
    except Exception as err:  # whatever torch.load raises on a damaged archive
        raise bad(f"cannot be read ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}); the file "
                  "is truncated or corrupt") from err
    if missing := [k for k in ("state_dict", "hyper_parameters") if not isinstance(ckpt, dict) or k not in ckpt]:
        raise bad(f"a PyTorch file but not a wgan_lit training checkpoint (no {' or '.join(missing)})")
    if "generator.net.0.weight" not in ckpt["state_dict"]:
        raise bad("a Lightning checkpoint of another model (no WGAN generator weights)")
    return ckpt

def architecture_mismatch(ckpt: dict[str, Any], model: L.LightningModule) -> list[str]:
    """Why ``ckpt`` cannot resume into ``model``: the settings that alone change its weights; empty if it can."""
    shapes = lambda state: {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}
    saved_shapes, wanted_shapes = shapes(ckpt["state_dict"]), shapes(model.state_dict())
    saved = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in RUNTIME_KEYS}  # e089f38 kept them there
    wanted = dict(model.hparams)  # and the optimizer's kind: torch loads Adam's state into RMSprop, then fails
    if saved_shapes == wanted_shapes and saved.get("optimizer") == wanted.get("optimizer"):
        return []
    def alone_breaks(key: str) -> bool:  # the checkpoint's settings with only this one as the config gives it
        try:
            with torch.device("meta"):
                other = type(model)(**{**saved, key: wanted[key]})
        except Exception:  # a key the config lacks, or a combination the model refuses: a suspect
            return True
        return key == "optimizer" or shapes(other.state_dict()) != saved_shapes
    keys = [k for k in {**wanted, **saved} if saved.get(k) != wanted.get(k)]
    if culprits := [k for k in keys if alone_breaks(k)] or keys:  # a learning rate changed beside is no suspect
        return [f"{CONFIG_KEYS.get(k, k)}: checkpoint has {saved.get(k)!r}, the config gives {wanted.get(k)!r}"
                for k in culprits]
    name = min(k for k in saved_shapes.keys() | wanted_shapes.keys() if saved_shapes.get(k) != wanted_shapes.get(k))
    return [f"{name}: checkpoint has {saved_shapes.get(name, 'no such weight')}, the networks of the config have "
            f"{wanted_shapes.get(name, 'no such weight')} with the same settings (another version of wgan_lit?)"]

def check_resumable(path: str | Path, model: L.LightningModule) -> dict[str, Any]:
    """Read ``path`` to resume ``model`` (which may be on the meta device) and check that it fits."""
    ckpt = read_checkpoint(path, what="ckpt_path")
    if bad := architecture_mismatch(ckpt, model):
        raise CheckpointError(f"ckpt_path {path}: does not fit the networks and optimizer of the config ("
                              f"{'; '.join(bad)}). Resume with the settings in the run's .hydra/config.yaml.")
    return ckpt
