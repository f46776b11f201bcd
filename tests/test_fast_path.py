"""fast_path.py: the choice logic with fake timings (no timed assertions), the cache, and the config's rules."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch
from torch._inductor.exc import InductorError, InvalidCxxCompiler

from tests.conftest import compose_train
from wgan_lit import fast_path
from wgan_lit.config import ConfigError, validate
from wgan_lit.fast_path import BASELINE, Candidate, candidates, choose, probe

BF16 = Candidate("bf16-mixed")
ONE_THREAD = Candidate(threads=1)


def fake(seconds: dict[Candidate, float], default: float = 1.0):
    """A timing function that returns made-up seconds per generator iteration and counts its calls."""
    calls: list[Candidate] = []

    def time_one(c: Candidate) -> float:
        calls.append(c)
        return seconds.get(c, default)

    return time_one, calls


def test_the_candidates_cover_precision_threads_and_layout_with_float32_defaults_among_them():
    cpu = candidates("cpu", cores=2)
    assert len(cpu) == 8 and BASELINE in cpu and BF16 in cpu and ONE_THREAD in cpu
    assert {c.precision for c in cpu} == {"32-true", "bf16-mixed"} and {c.channels_last for c in cpu} == {True, False}
    assert not any(c.compile for c in cpu)  # compile is timed on the winner only
    assert {c.threads for c in candidates("gpu", cores=16)} == {0} and len(candidates("cpu", cores=1)) == 4


def test_the_fastest_candidate_wins_where_bf16_is_faster():
    assert choose({BASELINE: 1.0, BF16: 0.7, ONE_THREAD: 0.9}) == BF16


def test_float32_is_kept_where_bf16_is_slower_or_no_faster_than_the_noise():
    assert choose({BASELINE: 1.0, BF16: 1.3}) == BASELINE  # the CPU where bf16 was 0.76x float32
    assert choose({BASELINE: 1.0, BF16: 0.97}) == BASELINE  # within the margin: not worth a different setting
    assert choose({BASELINE: 1.0, BF16: 0.9}) == BF16  # control: beyond the margin it is chosen


def test_the_probe_takes_the_median_over_interleaved_rounds():
    rounds = iter([1.0, 5.0, 1.0, 0.6, 1.0, 0.6])  # BASELINE, BF16 alternately; BF16 had one slow round
    choice, seconds = probe(lambda c: next(rounds), [BASELINE, BF16], rounds=3, try_compile=False)
    assert seconds[BF16] == 0.6 and choice == BF16


def test_compile_is_tried_on_the_winner_and_kept_only_when_it_is_faster():
    compiled = Candidate("bf16-mixed", compile=True)
    time_one, calls = fake({BF16: 0.5, compiled: 0.3})
    choice, seconds = probe(time_one, [BASELINE, BF16], rounds=1, try_compile=True)
    assert calls == [BASELINE, BF16, compiled] and choice == compiled
    time_one, _ = fake({BF16: 0.5, compiled: 0.6})
    assert probe(time_one, [BASELINE, BF16], rounds=1, try_compile=True)[0] == BF16


def test_resolve_applies_the_choice_caches_it_per_machine_and_workload_and_reuses_it(tmp_path, monkeypatch):
    cache = tmp_path / "fast_path.json"
    cfg = validate(compose_train(["experiment=fashion_cpu_15min", f"fast_path.cache={cache}"]))
    time_one, calls = fake({Candidate("bf16-mixed", 1, False): 0.4})
    out = fast_path.resolve(cfg, channels=1, time_one=time_one)
    assert (out.trainer["precision"], out.cpu_threads, out.runtime.channels_last, out.runtime.compile) == (
        "bf16-mixed", 1, False, False)
    assert out.trainer["max_time"] == cfg.trainer["max_time"] and out.model.lr_g == cfg.model.lr_g  # the rest kept
    n_timed = len(calls)
    assert n_timed == 8 * cfg.fast_path.rounds + 1  # every candidate per round, then compile on the winner
    entry = json.loads(cache.read_text())[fast_path.machine_key("auto")]
    assert len(entry) == 1 and next(iter(entry.values()))["choice"]["precision"] == "bf16-mixed"
    again = fast_path.resolve(cfg, channels=1, time_one=time_one)
    assert len(calls) == n_timed and again.trainer["precision"] == "bf16-mixed"  # from the cache, not timed
    wider = validate(compose_train(["experiment=fashion_cpu_15min", f"fast_path.cache={cache}",
                                    "model.d_features=64"]))
    fast_path.resolve(wider, channels=1, time_one=time_one)
    assert len(calls) == 2 * n_timed  # another workload is timed anew


def no_compiler(seconds: dict[Candidate, float]):
    """``fake`` where every compile candidate raises what torch.compile raises without a C++ compiler."""
    time_one, calls = fake(seconds)

    def timing(c: Candidate) -> float:
        if c.compile:
            calls.append(c)
            raise InductorError(InvalidCxxCompiler(), None)
        return time_one(c)

    return timing, calls


def test_without_a_cxx_compiler_compile_is_skipped_with_one_line_and_the_fastest_uncompiled_candidate_trains(
        tmp_path, caplog):
    cfg = validate(compose_train(["experiment=fashion_cpu_15min", f"fast_path.cache={tmp_path / 'fp.json'}"]))
    time_one, calls = no_compiler({BF16: 0.5})
    with caplog.at_level(logging.INFO, logger="wgan_lit.fast_path"):
        out = fast_path.resolve(cfg, channels=1, time_one=time_one)
    assert calls[-1].compile and (out.trainer["precision"], out.runtime.compile) == ("bf16-mixed", False)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [f"fast path: torch.compile skipped: InductorError: InvalidCxxCompiler: No working C++ "
                      f"compiler found in torch._inductor.config.cpp.cxx: {torch._inductor.config.cpp.cxx}"]


def test_a_candidate_that_fails_is_dropped_and_not_timed_again_but_float32_failing_is_an_error(caplog):
    def time_one(c: Candidate) -> float:
        calls.append(c)
        if c in (BF16, BASELINE if baseline_fails else BF16):
            raise RuntimeError("bf16 is not supported here\nsecond line")
        return 0.5 if c == ONE_THREAD else 1.0

    calls: list[Candidate] = []
    baseline_fails = False
    choice, seconds = probe(time_one, [BASELINE, BF16, ONE_THREAD], rounds=2, try_compile=False)
    assert choice == ONE_THREAD and BF16 not in seconds and calls.count(BF16) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "fast path: bf16-mixed, all threads, channels_last dropped: RuntimeError: bf16 is not supported here"]
    baseline_fails = True
    with pytest.raises(RuntimeError, match="not supported"):
        probe(time_one, [BASELINE, BF16], rounds=1, try_compile=False)


def test_a_cached_compiled_choice_is_used_without_compile_when_fast_path_compile_is_false(tmp_path):
    cache = tmp_path / "fast_path.json"
    overrides = ["experiment=fashion_cpu_15min", f"fast_path.cache={cache}"]
    time_one, calls = fake({BF16: 0.5, Candidate("bf16-mixed", compile=True): 0.3})
    assert fast_path.resolve(validate(compose_train(overrides)), channels=1, time_one=time_one).runtime.compile
    n_timed = len(calls)
    off = fast_path.resolve(validate(compose_train([*overrides, "fast_path.compile=false"])), 1, time_one)
    assert (off.trainer["precision"], off.runtime.compile) == ("bf16-mixed", False) and len(calls) == n_timed
    on = fast_path.resolve(validate(compose_train(overrides)), 1, time_one)  # control: the entry still holds it
    assert on.runtime.compile and len(calls) == n_timed


def test_a_choice_cached_with_compile_off_is_timed_again_with_compile_on(tmp_path):
    cache = tmp_path / "fast_path.json"
    overrides = ["experiment=fashion_cpu_15min", f"fast_path.cache={cache}"]
    time_one, calls = fake({BF16: 0.5, Candidate("bf16-mixed", compile=True): 0.3})
    assert not fast_path.resolve(validate(compose_train([*overrides, "fast_path.compile=false"])), 1,
                                 time_one).runtime.compile
    assert not calls[-1].compile
    assert fast_path.resolve(validate(compose_train(overrides)), 1, time_one).runtime.compile and calls[-1].compile


# ---- a resume takes the checkpoint's runtime settings, not the probe's or the cache's ----------------------

RECORD = {"precision": "32-true", "cpu_threads": 1, "channels_last": False, "compile": False, "fused_clamp": True}


def resuming(monkeypatch, overrides: list[str], record: dict | None = RECORD):
    """The validated config of ``overrides`` resuming from a checkpoint whose wgan_runtime is ``record``."""
    monkeypatch.setattr(fast_path, "recorded_runtime", lambda path: None if record is None else dict(record))
    cfg = validate(compose_train(overrides))
    cfg.ckpt_path = "run/checkpoints/last.ckpt"  # after validate, which wants the file to exist
    return cfg


def bf16_cache(path, cfg) -> str:
    """A cache whose entry for ``cfg`` here says bf16-mixed, as another probe on this machine may have found."""
    choice = {"precision": "bf16-mixed", "threads": 0, "channels_last": True, "compile": False}
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    text = json.dumps({fast_path.machine_key(accelerator): {fast_path.workload_key(cfg, 1): {
        "choice": choice, "compile_tried": True}}})
    path.write_text(text)
    return text


def test_a_resume_with_the_probe_on_takes_the_checkpoints_float32_not_the_caches_bf16(tmp_path, monkeypatch,
                                                                                      caplog):
    cache = tmp_path / "fast_path.json"
    overrides = ["experiment=fashion_cpu_15min", f"fast_path.cache={cache}"]
    text = bf16_cache(cache, validate(compose_train(overrides)))
    fresh = fast_path.resolve(validate(compose_train(overrides)), 1, lambda c: pytest.fail("timed"))
    assert fresh.trainer["precision"] == "bf16-mixed"  # control: a new run does read that cache
    cfg = resuming(monkeypatch, overrides)
    with caplog.at_level(logging.INFO, logger="wgan_lit.fast_path"):
        out = fast_path.resolve(cfg, 1, lambda c: pytest.fail("timed on resume"))
    assert (out.trainer["precision"], out.cpu_threads, out.runtime.channels_last, out.runtime.compile,
            out.runtime.fused_clamp) == ("32-true", 1, False, False, True)
    assert cache.read_text() == text and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_resume_without_the_probe_takes_the_checkpoints_precision_when_none_is_given(monkeypatch, caplog):
    record = {**RECORD, "precision": "bf16-mixed", "cpu_threads": 0, "channels_last": True}
    with caplog.at_level(logging.WARNING, logger="wgan_lit.fast_path"):
        out = fast_path.resolve(resuming(monkeypatch, ["trainer=cpu"], record), 1, lambda c: pytest.fail("timed"))
    assert out.trainer["precision"] == "bf16-mixed" and out.trainer["accelerator"] == "cpu" and not caplog.records


def test_a_precision_given_on_resume_that_differs_from_the_checkpoints_is_honoured_with_one_warning_naming_both(
        monkeypatch, caplog):
    record = {**RECORD, "cpu_threads": 0, "channels_last": True}  # the config's defaults: only precision differs
    with caplog.at_level(logging.WARNING, logger="wgan_lit.fast_path"):
        out = fast_path.resolve(resuming(monkeypatch, ["trainer.precision=bf16-mixed"], record), 1)
    assert out.trainer["precision"] == "bf16-mixed"
    assert [r.getMessage() for r in caplog.records] == [
        "resume: trainer.precision=bf16-mixed (the checkpoint's: 32-true), as the config says: the run does not "
        "go on exactly as it started"]
    caplog.clear()
    same = fast_path.resolve(resuming(monkeypatch, ["trainer.precision=32"], record), 1)  # Lightning's alias
    assert same.trainer["precision"] == "32-true" and not caplog.records


def test_a_checkpoint_that_records_no_runtime_settings_resumes_with_the_probe_as_before(tmp_path, monkeypatch):
    cfg = resuming(monkeypatch, ["experiment=fashion_cpu_15min", f"fast_path.cache={tmp_path / 'fp.json'}"],
                   record=None)
    time_one, calls = fake({BF16: 0.5})
    assert fast_path.resolve(cfg, 1, time_one).trainer["precision"] == "bf16-mixed" and calls


def test_timing_a_candidate_leaves_every_rng_as_it_found_it(monkeypatch):
    cfg = validate(compose_train(["experiment=fashion_cpu_15min", "model.g_features=8", "model.d_features=8",
                                  "model.latent_dim=16", "model.n_fixed_samples=4", "data.batch_size=8"]))
    seeded: list[int] = []
    for name in ("manual_seed", "manual_seed_all"):  # where a global seed reaches CUDA's RNG
        original = getattr(torch.cuda, name)
        monkeypatch.setattr(torch.cuda, name, lambda seed, f=original: (seeded.append(seed), f(seed))[1])
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    seeded.clear()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1]
    assert fast_path.time_candidate(cfg, 1, BASELINE, iters=2, warmup=1) > 0
    assert seeded == []  # on a CPU-only machine the only sign that CUDA's RNG would be reset
    assert all(torch.equal(a, b) for a, b in zip(cuda, torch.cuda.get_rng_state_all() if cuda else [], strict=True))
    assert torch.equal(states[0], torch.random.get_rng_state()) and states[1] == random.getstate()
    assert (states[2] == np.random.get_state()[1]).all()


def test_without_the_probe_the_config_is_left_as_it_is():
    cfg = validate(compose_train(["trainer.precision=bf16-mixed"]))
    assert fast_path.resolve(cfg, channels=1, time_one=lambda c: pytest.fail("timed")) is cfg


@pytest.mark.parametrize("override", ["trainer.precision=32-true", "cpu_threads=1", "runtime.channels_last=false",
                                      "runtime.compile=true"])
def test_a_setting_the_probe_chooses_is_refused_when_set_by_hand_with_the_probe_on(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{key}=.*fast_path.probe=false to set it yourself"):
        validate(compose_train(["experiment=fashion_cpu_15min", override]))
    validate(compose_train(["experiment=fashion_cpu_15min", "fast_path.probe=false", override]))  # control


def test_the_probe_refuses_more_than_one_process():
    with pytest.raises(ConfigError, match="^fast_path.probe=True: .*more than one device"):
        validate(compose_train(["trainer=ddp_cpu", "fast_path.probe=true"]))
