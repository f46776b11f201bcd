"""How a run computes (RUNTIME_KEYS): the fastest candidate timed here (``fast_path.probe``, cached), or on a resume
the checkpoint's ``wgan_runtime``, so a float32 run stays float32 whatever a new probe or another cache says."""

from __future__ import annotations

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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

from wgan_lit.checkpointing import atomic_write, read_checkpoint
from wgan_lit.config import RUNTIME_KEYS, TrainConfig, user_cache_dir
from wgan_lit.module import WGAN

log = logging.getLogger("wgan_lit.fast_path")
MARGIN = 0.05  # a candidate must be this much faster than float32 to be chosen over it
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}  # Lightning's

@dataclass(frozen=True)
class Candidate:
    precision: str = "32-true"
    threads: int = 0  # torch.set_num_threads; 0 = torch's default (one per core)
    channels_last: bool = True
    compile: bool = False

BASELINE = Candidate()  # float32 with the defaults

def candidates(accelerator: str, cores: int) -> list[Candidate]:
    """Every precision, thread count and memory layout worth timing here (compile is tried on the winner)."""
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    threads = [0, 1] if on_cpu and cores > 1 else [0]
    return [Candidate(p, t, c) for p in ("32-true", "bf16-mixed") for t in threads for c in (True, False)]

def probe(time_one: Callable[[Candidate], float], cands: list[Candidate], rounds: int, try_compile: bool
          ) -> tuple[Candidate, dict[Candidate, float]]:
    """(choice, seconds per generator iteration): medians of interleaved rounds (load hits all alike); float32 unless
    another is MARGIN faster; then, with ``try_compile``, the choice compiled. One that fails: dropped, one log line."""
    def timed(cand: Candidate) -> float | None:
        try:
            return time_one(cand)
        except Exception as e:
            if cand == BASELINE:
                raise
            log.warning("fast path: %s: %s: %s", "torch.compile skipped" if cand.compile else f"{cand} dropped",
                        type(e).__name__, (str(e).strip().splitlines() or [""])[0])
    times: dict[Candidate, list[float]] = {c: [] for c in cands}
    for _ in range(rounds):  # one that failed is not timed again
        times = {c: [*v, t] for c, v in times.items() if (t := timed(c)) is not None}
    seconds = {c: statistics.median(v) for c, v in times.items()}
    choice = min(seconds, key=lambda c: seconds[c] * (1 - MARGIN if c == BASELINE else 1))  # float32 by a MARGIN
    if try_compile and (t := timed(compiled := replace(choice, compile=True))) is not None:
        seconds[compiled] = t
        choice = compiled if t < (1 - MARGIN) * seconds[choice] else choice
    return choice, seconds

def cpu_name() -> str:
    """The CPU's name and a digest of its flags (VMs call several generations "AMD EPYC"; flags decide bf16)."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    info = {k.strip(): v.strip() for k, _, v in reversed([line.partition(":") for line in lines])}  # the first's
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name} (flags {hashlib.sha256(info['flags'].encode()).hexdigest()[:8]})" if info.get("flags") else name

def machine_key(accelerator: str) -> str:
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return f"{torch.cuda.get_device_name() if gpu else cpu_name()} | {os.cpu_count()} cores | torch {torch.__version__}"

def workload_key(cfg: TrainConfig, channels: int) -> str:
    skip = ("lr_g", "lr_d", "fixed_noise_seed", "n_fixed_samples", "paper_critic_schedule", "clip_value")  # no work
    work = dict({k: v for k, v in asdict(cfg.model).items() if k not in skip}, channels=channels,
                image_size=cfg.data.image_size, batch_size=cfg.data.batch_size, fused_clamp=cfg.runtime.fused_clamp)
    return hashlib.sha256(json.dumps(work, sort_keys=True).encode()).hexdigest()[:16]

def apply(cfg: TrainConfig, precision: str, cpu_threads: int, **switches: bool) -> TrainConfig:
    return replace(cfg, trainer={**cfg.trainer, "precision": precision}, cpu_threads=cpu_threads,
                               runtime=replace(cfg.runtime, **switches))

def resolve(cfg: TrainConfig, channels: int, time_one: Callable[[Candidate], float] | None = None) -> TrainConfig:
    """``cfg`` with the runtime settings to train with: a resume's recorded ones, the probe's, or its own."""
    record = read_checkpoint(cfg.ckpt_path, "ckpt_path").get("wgan_runtime") if cfg.ckpt_path else None
    if isinstance(record, dict) and set(RUNTIME_KEYS) <= set(record):  # (older checkpoints: as a new run)
        own = dict(precision=cfg.trainer.get("precision"), cpu_threads=cfg.cpu_threads, **asdict(cfg.runtime))
        # The checkpoint's but for what the config sets (with the probe on, its keys stay unset), warned about.
        run = {k: record[k] if v is None or (cfg.fast_path.probe and k != "fused_clamp") else v for k, v in own.items()}
        run["precision"] = PRECISION_ALIASES.get(str(p := run["precision"]), p)  # "32" is the "32-true" recorded
        key = {"precision": "trainer.precision", "cpu_threads": "cpu_threads"}
        if differ := ", ".join(f"{key.get(k, 'runtime.' + k)}={run[k]} (the checkpoint's: {record[k]})"
                               for k in RUNTIME_KEYS if run[k] != record[k]):
            log.warning("resume: %s, as the config says: the run does not go on exactly as it started", differ)
        return apply(cfg, **run)
    if not (fp := cfg.fast_path).probe:
        return cfg
    accelerator, path = cfg.trainer.get("accelerator", "auto"), Path(fp.cache or user_cache_dir() / "fast_path.json")
    machine, work = machine_key(accelerator), workload_key(cfg, channels)
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: probe again and rewrite it
        cache = {}
    # An entry made with fast_path.compile=false does not say whether compile would win: timed again with it on.
    if (entry := cache.get(machine, {}).get(work)) is None or not (entry.get("compile_tried") or not fp.compile):
        cands = candidates(accelerator, os.cpu_count() or 1)
        log.info("fast path: timing %d candidates, %d rounds of %d iterations", len(cands), fp.rounds, fp.iters)
        choice, seconds = probe(time_one or (lambda c: time_candidate(cfg, channels, c, fp.iters)), cands,
                                fp.rounds, fp.compile)
        rates = {str(c): round(1 / s, 2) for c, s in seconds.items()}
        log.info("fast path for %s, generator it/s: %s", machine, rates)
        entry = cache.setdefault(machine, {})[work] = {"choice": asdict(choice),
                                                       "compile_tried": fp.compile, "gen_it_per_s": rates}
        with atomic_write(path) as tmp:  # a concurrent run reads the old file or the new one
            tmp.write_text(json.dumps(cache, indent=2))
    # Compile was timed on the fastest uncompiled candidate: without it, that one is the choice.
    choice = Candidate(**{**entry["choice"], "compile": entry["choice"]["compile"] and fp.compile})
    log.info("fast path (%s for %s): %s", path, machine, choice)
    return apply(cfg, choice.precision, choice.threads, channels_last=choice.channels_last, compile=choice.compile,
                 fused_clamp=cfg.runtime.fused_clamp)

# ---- the timing harness: one candidate, the run's own networks on random images, through a Trainer ----------

class GenIterStamps(L.Callback):
    """Time stamps at the ends of generator iterations ``warmup`` to ``warmup + iters``; then the fit stops."""
    def __init__(self, warmup: int, iters: int) -> None:
        self.warmup, self.iters, self.stamps = warmup, iters, []
    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *_: Any) -> None:
        if module.critic_step_in_iter == 0 and module.gen_step >= self.warmup:
            if module.device.type == "cuda":
                torch.cuda.synchronize(module.device)
            self.stamps.append(time.perf_counter())
            trainer.should_stop |= module.gen_step >= self.warmup + self.iters  # never unsets a stop

def time_candidate(cfg: TrainConfig, channels: int, cand: Candidate, iters: int, warmup: int = 2) -> float:
    """Median seconds per generator iteration; every RNG (CUDA's too), the thread count and log level kept."""
    hp = {**asdict(cfg.model), "paper_critic_schedule": False}  # its 100-step phases swamp timings
    size, threads, quiet = cfg.data.image_size, torch.get_num_threads(), logging.getLogger("lightning.pytorch")
    level, stamps = quiet.level, GenIterStamps(warmup + 3 * cand.compile, iters)  # compiling: in the warm-up
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet.setLevel(logging.ERROR)  # no Trainer banners per candidate
        torch.set_num_threads(cand.threads or threads)
        try:
            L.Trainer(accelerator=cfg.trainer.get("accelerator", "auto"), devices=1, precision=cand.precision,
                      max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[stamps]).fit(
                WGAN(image_size=size, channels=channels, channels_last=cand.channels_last, compile=cand.compile,
                     fused_clamp=cfg.runtime.fused_clamp, **hp),
                itertools.repeat(torch.rand(cfg.data.batch_size, channels, size, size) * 2 - 1))
        finally:
            torch.set_num_threads(threads)
            quiet.setLevel(level)
    return statistics.median(b - a for a, b in itertools.pairwise(stamps.stamps))
