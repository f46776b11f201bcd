"""Choose how to run a workload on this machine by timing it: ``fast_path.probe=true``.

The fastest settings differ between machines (bf16 autocast was 1.4x float32 on one 2-core CPU and 0.76x on
another), so they are measured, not assumed. The probe trains a few generator iterations of the run's own
networks on random images for each candidate, through the same Lightning Trainer, and keeps the fastest:

* ``trainer.precision``: ``32-true`` or ``bf16-mixed``;
* ``cpu_threads``: one per core or one (on a CPU);
* ``runtime.channels_last``: NHWC or NCHW;
* ``runtime.compile``: tried last, on the fastest of the above (compiling takes a minute, once per machine).

Float32 with the defaults is the baseline; another candidate must beat it by ``MARGIN`` to be chosen, so the
choice is never slower than float32 by more than the timing noise. A candidate that fails (bf16 where it is
unsupported, compile without a C++ compiler) is dropped with one log line; float32 failing is an error. The
result is printed and cached per machine and workload (``fast_path.cache``), so later runs start at once.

A resume (``ckpt_path``) neither probes nor reads the cache: it takes what the checkpoint's ``wgan_runtime``
recorded, so a run that started in float32 goes on in float32 on any machine (:func:`resumed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from wgan_lit.checkpointing import atomic_write, read_checkpoint
from wgan_lit.config import RUNTIME_KEYS, TrainConfig, user_cache_dir
from wgan_lit.data import InMemoryImages, pass_through

log = logging.getLogger("wgan_lit.fast_path")
MARGIN = 0.05  # a candidate must be this much faster than float32 to be chosen over it
# The config keys the probe decides; fast_path.probe=true refuses them set by hand (config.py's rules).
DECIDES = ("trainer.precision", "cpu_threads", "runtime.channels_last", "runtime.compile")
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}
# The config key of each entry of a checkpoint's wgan_runtime (RUNTIME_KEYS).
RUNTIME_CONFIG_KEYS = {"precision": "trainer.precision", "cpu_threads": "cpu_threads",
                       "channels_last": "runtime.channels_last", "compile": "runtime.compile",
                       "fused_clamp": "runtime.fused_clamp"}


@dataclass(frozen=True)
class Candidate:
    precision: str = "32-true"
    threads: int = 0  # torch.set_num_threads; 0 = torch's default (one per core)
    channels_last: bool = True
    compile: bool = False

    def label(self) -> str:
        threads = f"{self.threads} thread" + ("s" if self.threads != 1 else "") if self.threads else "all threads"
        return (f"{self.precision}, {threads}, {'channels_last' if self.channels_last else 'NCHW'}"
                + (", compile" if self.compile else ""))


BASELINE = Candidate()  # float32 with the defaults


def candidates(accelerator: str, cores: int) -> list[Candidate]:
    """Every combination of precision, threads and memory layout worth timing here (compile comes later)."""
    threads = [0, 1] if accelerator == "cpu" and cores > 1 else [0]
    return [Candidate(p, t, c) for p, t, c in itertools.product(("32-true", "bf16-mixed"), threads, (True, False))]


def choose(seconds: dict[Candidate, float]) -> Candidate:
    """The fastest candidate (seconds per generator iteration), unless float32 is within MARGIN of it."""
    fastest = min(seconds, key=seconds.get)
    if BASELINE in seconds and seconds[fastest] > (1 - MARGIN) * seconds[BASELINE]:
        return BASELINE
    return fastest


def probe(time_one: Callable[[Candidate], float], cands: list[Candidate], rounds: int, try_compile: bool
          ) -> tuple[Candidate, dict[Candidate, float]]:
    """Time every candidate ``rounds`` times, interleaved (a burst of load hits all alike), and take the median;
    then, with ``try_compile``, the fastest once more with torch.compile. Returns (choice, seconds)."""
    times: dict[Candidate, list[float]] = {c: [] for c in cands}
    for _ in range(rounds):
        for c in list(times):
            if (t := timed(time_one, c)) is None:
                del times[c]  # not retried in later rounds
            else:
                times[c].append(t)
    seconds = {c: statistics.median(v) for c, v in times.items()}
    choice = choose(seconds)
    compiled = dataclasses.replace(choice, compile=True)
    if try_compile and (t := timed(time_one, compiled)) is not None:
        seconds[compiled] = t
        if t < (1 - MARGIN) * seconds[choice]:
            choice = compiled
    return choice, seconds


def timed(time_one: Callable[[Candidate], float], cand: Candidate) -> float | None:
    """``time_one(cand)``, or None with one log line where it raises; float32 with the defaults must work."""
    try:
        return time_one(cand)
    except Exception as e:
        if cand == BASELINE:
            raise
        what = "torch.compile skipped" if cand.compile else f"{cand.label()} dropped"
        log.warning("fast path: %s: %s: %s", what, type(e).__name__, (str(e).strip().splitlines() or [""])[0])
        return None


# ---- timing one candidate with the run's own Trainer ---------------------------------------------------


class GenIterStamps(L.Callback):
    """A time stamp at the end of every generator iteration after ``warmup``; stops ``iters`` later (also the
    timer of benchmarks/throughput.py)."""

    def __init__(self, warmup: int, iters: int) -> None:
        self.warmup, self.iters, self.stamps = warmup, iters, []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        if pl_module.critic_step_in_iter != 0 or pl_module.gen_step < self.warmup:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.stamps.append(time.perf_counter())
        if pl_module.gen_step >= self.warmup + self.iters:
            trainer.should_stop = True


def time_candidate(cfg: TrainConfig, channels: int, cand: Candidate, iters: int, warmup: int = 2) -> float:
    """Median seconds per generator iteration of the run's networks on random images with ``cand``."""
    from wgan_lit.module import WGAN

    hp = {**dataclasses.asdict(cfg.model), "paper_critic_schedule": False}  # its 100-step phases swamp timings
    switches = {"channels_last": cand.channels_last, "compile": cand.compile, "fused_clamp": cfg.runtime.fused_clamp}
    size, batch = cfg.data.image_size, cfg.data.batch_size
    before = torch.get_num_threads()
    # The images, weights and noise draw from torch's RNGs: all are restored after it, CUDA's too.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = InMemoryImages(torch.rand(4 * batch, channels, size, size) * 2 - 1)
        loader = DataLoader(images, batch_size=batch, drop_last=True, collate_fn=pass_through,
                            sampler=RandomSampler(images, replacement=True, num_samples=10**9))
        if cand.threads:
            torch.set_num_threads(cand.threads)
        try:
            stamps = GenIterStamps(warmup + (3 if cand.compile else 0), iters)  # compiling happens in the warm-up
            trainer = L.Trainer(
                accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, precision=cand.precision,
                max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[stamps])
            trainer.fit(WGAN(image_size=size, channels=channels, **switches, **hp), train_dataloaders=loader)
        finally:
            torch.set_num_threads(before)
    return statistics.median(b - a for a, b in itertools.pairwise(stamps.stamps))


# ---- the cache and what train.py calls ------------------------------------------------------------------


def machine_key(accelerator: str) -> str:
    """What the timings depend on besides the workload: the processor (or GPU), cores, torch's version."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        device = torch.cuda.get_device_name(0)
    else:
        device = cpu_name()
    return f"{device} | {os.cpu_count()} cores | torch {torch.__version__}"


def cpu_name() -> str:
    """The model name and a digest of the feature flags: virtual machines often report a bare "AMD EPYC"
    for CPUs of different generations, and the flags (avx512_bf16, amx_bf16, ...) decide bf16's speed."""
    name, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = hashlib.sha256(line.split(":", 1)[1].strip().encode()).hexdigest()[:8]
    except OSError:
        pass
    return f"{name} (flags {flags})" if flags else name


def workload_key(cfg: TrainConfig, channels: int) -> str:
    """The settings that change the work of one generator iteration."""
    work = {k: v for k, v in dataclasses.asdict(cfg.model).items()
            if k not in ("lr_g", "lr_d", "fixed_noise_seed", "n_fixed_samples", "paper_critic_schedule",
                         "clip_value")}
    # fused_clamp was a model key when the cache was first written: the same keys keep its entries valid.
    work.update(image_size=cfg.data.image_size, batch_size=cfg.data.batch_size, channels=channels,
                fused_clamp=cfg.runtime.fused_clamp)
    return hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()[:16]


def cache_path(configured: str) -> Path:
    if configured:
        return Path(configured)
    return user_cache_dir() / "fast_path.json"


def apply(cfg: TrainConfig, cand: Candidate) -> TrainConfig:
    """``cfg`` with the candidate's settings."""
    return dataclasses.replace(
        cfg, trainer={**cfg.trainer, "precision": cand.precision}, cpu_threads=cand.threads,
        runtime=dataclasses.replace(cfg.runtime, channels_last=cand.channels_last, compile=cand.compile))


def table(seconds: dict[Candidate, float], choice: Candidate) -> str:
    base = seconds.get(BASELINE)
    rows = [f"  {c.label():<50} {1 / s:8.2f} gen it/s" + (f"  {base / s:5.2f}x float32" if base else "")
            + ("  <- chosen" if c == choice else "") for c, s in sorted(seconds.items(), key=lambda x: x[1])]
    return "\n".join(rows)


def resolve(cfg: TrainConfig, channels: int,
            time_one: Callable[[Candidate], float] | None = None) -> TrainConfig:
    """With ``fast_path.probe``, the config with the settings measured fastest here (cached); else ``cfg``.
    A resume takes the checkpoint's recorded settings instead (:func:`resumed`)."""
    fp = cfg.fast_path
    if cfg.ckpt_path:
        if (record := recorded_runtime(cfg.ckpt_path)) is not None:
            return resumed(cfg, record)
        log.info("fast path: %s records no runtime settings (written before wgan_runtime): the config decides",
                 cfg.ckpt_path)
    if not fp.probe:
        return cfg
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    machine, work = machine_key(accelerator), workload_key(cfg, channels)
    path = cache_path(fp.cache)
    cache = _read(path)
    entry = cache.get(machine, {}).get(work)
    # compile was timed on the fastest uncompiled candidate, so without it that one is the choice; an entry
    # made with fast_path.compile=false does not say whether compile would win: timed again with it on.
    if entry is not None and (entry.get("compile_tried") or not fp.compile):
        choice = Candidate(**{**entry["choice"], "compile": entry["choice"]["compile"] and fp.compile})
        log.info("fast path (cached in %s for %s): %s", path, machine, choice.label())
        return apply(cfg, choice)
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cands = candidates("cpu" if on_cpu else "gpu", os.cpu_count() or 1)
    log.info("fast path: timing %d candidates x %d rounds of %d generator iterations%s ...", len(cands),
             fp.rounds, fp.iters, ", then torch.compile" if fp.compile else "")
    time_one = time_one or (lambda c: time_candidate(cfg, channels, c, fp.iters))
    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # no Trainer banners per candidate
    try:
        choice, seconds = probe(time_one, cands, fp.rounds, fp.compile)
    finally:
        quiet.setLevel(level)
    log.info("fast path for %s:\n%s", machine, table(seconds, choice))
    cache.setdefault(machine, {})[work] = {"choice": dataclasses.asdict(choice), "compile_tried": fp.compile,
                                           "gen_it_per_s": {c.label(): 1 / s for c, s in seconds.items()}}
    with atomic_write(path) as tmp:  # a concurrent run reads the old file or the new one
        tmp.write_text(json.dumps(cache, indent=2))
    return apply(cfg, choice)


def recorded_runtime(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The ``wgan_runtime`` entry of a checkpoint (RUNTIME_KEYS), or None where it has none (an older one)."""
    record = read_checkpoint(ckpt_path, what="ckpt_path").get("wgan_runtime")  # a bad file: CheckpointError
    return record if isinstance(record, dict) and set(RUNTIME_KEYS) <= set(record) else None


def resumed(cfg: TrainConfig, record: dict[str, Any]) -> TrainConfig:
    """The config of a resume: the checkpoint's ``record`` replaces the probe and its cache, which on this
    machine (or after a new probe) may choose otherwise, e.g. bf16 for a run that trained in float32.

    With ``fast_path.probe`` the keys it decides are unset (the config's rules), so all are the checkpoint's;
    an unset ``trainer.precision`` is too. What the config does set (``fast_path.probe=false``) is honoured,
    with one warning naming both values where it differs from the checkpoint's: the run then does not go on
    exactly as it started, which may be the point (a GPU run continued on a CPU without bf16)."""
    precision = cfg.trainer.get("precision")
    # Lightning's short names ("32", "bf16") are the long ones it records (trainer.precision): no false alarm.
    chosen = {"precision": record["precision"] if precision is None else PRECISION_ALIASES.get(str(precision),
                                                                                               str(precision)),
              "cpu_threads": cfg.cpu_threads, **dataclasses.asdict(cfg.runtime)}
    if cfg.fast_path.probe:
        chosen.update({k: record[k] for k in ("cpu_threads", "channels_last", "compile")})
    differ = [f"{RUNTIME_CONFIG_KEYS[k]}={chosen[k]} (the checkpoint's: {record[k]})"
              for k in RUNTIME_KEYS if chosen[k] != record[k]]
    if differ:
        log.warning("resume: %s, as the config says: the run does not go on exactly as it started",
                    ", ".join(differ))
    log.info("fast path: resuming with the settings of %s", cfg.ckpt_path)
    return dataclasses.replace(
        cfg, trainer={**cfg.trainer, "precision": chosen["precision"]}, cpu_threads=chosen["cpu_threads"],
        runtime=dataclasses.replace(cfg.runtime, **{k: chosen[k] for k in ("channels_last", "compile",
                                                                           "fused_clamp")}))


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: probe again and rewrite it
        return {}
