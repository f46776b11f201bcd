"""fast_path.py: the choice with fake timings (no timed assertions), its cache, a resume's record, the harness."""

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
from wgan_lit.fast_path import BASELINE, Candidate, candidates, probe

BF16, ONE_THREAD, BF16_COMPILED = Candidate("bf16-mixed"), Candidate(threads=1), Candidate("bf16-mixed", compile=True)
PRESET = ["experiment=fashion_cpu_15min"]

def fake(seconds: dict[Candidate, float], fails: tuple = ()):
    """Made-up seconds per generator iteration (1.0 unless given); raises for ``fails``; records its calls."""
    calls: list[Candidate] = []
    def time_one(c: Candidate) -> float:
        calls.append(c)
        if c in fails or (c.compile and "compile" in fails):
            raise InductorError(InvalidCxxCompiler(), None) if c.compile else RuntimeError("no bf16 here\nline 2")
        return seconds.get(c, 1.0)
    return time_one, calls

def preset(tmp_path, *overrides: str):
    return validate(compose_train([*PRESET, f"fast_path.cache={tmp_path / 'fp.json'}", *overrides]))

def test_the_candidates_cover_precision_threads_and_layout_with_float32_defaults_among_them():
    cpu = candidates("cpu", cores=2)
    assert len(cpu) == 8 and BASELINE in cpu and BF16 in cpu and ONE_THREAD in cpu and not any(c.compile for c in cpu)
    assert {c.precision for c in cpu} == {"32-true", "bf16-mixed"} and {c.channels_last for c in cpu} == {True, False}
    assert {c.threads for c in candidates("gpu", cores=16)} == {0} and len(candidates("cpu", cores=1)) == 4

@pytest.mark.parametrize("seconds,chosen", [  # the fastest wins; the CPU where bf16 was 0.76x float32
    ({BASELINE: 1.0, BF16: 0.7, ONE_THREAD: 0.9}, BF16), ({BASELINE: 1.0, BF16: 1.3}, BASELINE),
    ({BASELINE: 1.0, BF16: 0.97}, BASELINE), ({BASELINE: 1.0, BF16: 0.9}, BF16)])  # within the margin; beyond it
def test_float32_is_kept_unless_another_candidate_is_faster_by_the_margin(seconds, chosen):
    assert probe(fake(seconds)[0], list(seconds), rounds=1, try_compile=False)[0] == chosen

def test_the_probe_takes_the_median_over_interleaved_rounds_then_compile_on_the_winner_kept_only_if_faster():
    rounds = iter([1.0, 5.0, 1.0, 0.6, 1.0, 0.6])  # BASELINE, BF16 alternately; BF16 had one slow round
    choice, seconds = probe(lambda c: next(rounds), [BASELINE, BF16], rounds=3, try_compile=False)
    assert seconds[BF16] == 0.6 and choice == BF16
    time_one, calls = fake({BF16: 0.5, BF16_COMPILED: 0.3})
    assert probe(time_one, [BASELINE, BF16], rounds=1, try_compile=True)[0] == BF16_COMPILED
    assert calls == [BASELINE, BF16, BF16_COMPILED]
    assert probe(fake({BF16: 0.5, BF16_COMPILED: 0.6})[0], [BASELINE, BF16], rounds=1, try_compile=True)[0] == BF16

def test_a_failing_candidate_is_dropped_with_one_line_and_not_timed_again_but_float32_failing_is_an_error(caplog):
    time_one, calls = fake({ONE_THREAD: 0.5}, fails=(BF16,))
    choice, seconds = probe(time_one, [BASELINE, BF16, ONE_THREAD], rounds=2, try_compile=False)
    assert choice == ONE_THREAD and BF16 not in seconds and calls.count(BF16) == 1
    assert [r.getMessage() for r in caplog.records] == [f"fast path: {BF16} dropped: RuntimeError: no bf16 here"]
    with pytest.raises(RuntimeError, match="no bf16"):
        probe(fake({}, fails=(BASELINE,))[0], [BASELINE, BF16], rounds=1, try_compile=False)

def test_without_a_cxx_compiler_compile_is_skipped_in_one_line_and_the_fastest_uncompiled_trains(tmp_path, caplog):
    time_one, calls = fake({BF16: 0.5}, fails=("compile",))
    with caplog.at_level(logging.INFO, logger="wgan_lit.fast_path"):
        out = fast_path.resolve(preset(tmp_path), channels=1, time_one=time_one)
    assert calls[-1].compile and (out.trainer["precision"], out.runtime.compile) == ("bf16-mixed", False)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "fast path: torch.compile skipped: InductorError: InvalidCxxCompiler: No working C++ compiler found in "
        f"torch._inductor.config.cpp.cxx: {torch._inductor.config.cpp.cxx}"]

def test_resolve_applies_the_choice_caches_it_per_machine_and_workload_and_reuses_it(tmp_path):
    plain = validate(compose_train(["trainer.precision=bf16-mixed"]))
    assert fast_path.resolve(plain, 1, lambda c: pytest.fail("timed")) is plain  # without the probe: as it is
    cfg = preset(tmp_path)
    time_one, calls = fake({Candidate("bf16-mixed", 1, False): 0.4})
    out = fast_path.resolve(cfg, channels=1, time_one=time_one)
    assert (out.trainer["precision"], out.cpu_threads, out.runtime.channels_last, out.runtime.compile) == (
        "bf16-mixed", 1, False, False)
    assert out.trainer["max_time"] == cfg.trainer["max_time"] and out.model.lr_g == cfg.model.lr_g  # the rest kept
    assert (n_timed := len(calls)) == 8 * cfg.fast_path.rounds + 1  # every candidate per round, then compile
    entry = json.loads((tmp_path / "fp.json").read_text())[fast_path.machine_key("auto")]
    assert len(entry) == 1 and next(iter(entry.values()))["choice"]["precision"] == "bf16-mixed"
    assert fast_path.resolve(cfg, 1, time_one).trainer["precision"] == "bf16-mixed" and len(calls) == n_timed
    fast_path.resolve(preset(tmp_path, "model.d_features=64"), 1, time_one)
    assert len(calls) == 2 * n_timed  # another workload is timed anew

def test_compile_false_takes_a_cached_compiled_choice_uncompiled_and_an_entry_made_without_is_retimed(tmp_path):
    time_one, calls = fake({BF16: 0.5, BF16_COMPILED: 0.3})
    assert fast_path.resolve(preset(tmp_path), 1, time_one).runtime.compile and (n_timed := len(calls))
    off = fast_path.resolve(preset(tmp_path, "fast_path.compile=false"), 1, time_one)
    assert (off.trainer["precision"], off.runtime.compile, len(calls)) == ("bf16-mixed", False, n_timed)
    assert fast_path.resolve(preset(tmp_path), 1, time_one).runtime.compile and len(calls) == n_timed  # control
    (tmp_path / "fp.json").unlink()
    assert not fast_path.resolve(preset(tmp_path, "fast_path.compile=false"), 1, time_one).runtime.compile
    assert not calls[-1].compile  # an entry made without compile does not say whether it wins: timed again
    assert fast_path.resolve(preset(tmp_path), 1, time_one).runtime.compile and calls[-1].compile

RECORD = {"precision": "32-true", "cpu_threads": 1, "channels_last": False, "compile": False, "fused_clamp": True}

def resuming(monkeypatch, overrides: list[str], record: dict | None = RECORD):
    """The validated config of ``overrides`` resuming from a checkpoint whose wgan_runtime is ``record``."""
    monkeypatch.setattr(fast_path, "read_checkpoint", lambda *a: {} if record is None else {"wgan_runtime": record})
    cfg = validate(compose_train(overrides))
    cfg.ckpt_path = "run/checkpoints/last.ckpt"  # after validate, which wants the file to exist
    return cfg

def test_a_resume_with_the_probe_on_takes_the_checkpoints_float32_not_the_caches_bf16(tmp_path, monkeypatch, caplog):
    choice = {"precision": "bf16-mixed", "threads": 0, "channels_last": True, "compile": False}
    text = json.dumps({fast_path.machine_key("auto"): {fast_path.workload_key(preset(tmp_path), 1): {
        "choice": choice, "compile_tried": True}}})
    (tmp_path / "fp.json").write_text(text)  # and a new run does read it:
    assert fast_path.resolve(preset(tmp_path), 1, lambda c: pytest.fail()).trainer["precision"] == "bf16-mixed"
    with caplog.at_level(logging.INFO, logger="wgan_lit.fast_path"):
        out = fast_path.resolve(resuming(monkeypatch, [*PRESET, f"fast_path.cache={tmp_path / 'fp.json'}"]), 1,
                                lambda c: pytest.fail("timed on resume"))
    assert (out.trainer["precision"], out.cpu_threads, out.runtime.channels_last, out.runtime.compile,
            out.runtime.fused_clamp) == tuple(RECORD.values())
    assert (tmp_path / "fp.json").read_text() == text and all(r.levelno < logging.WARNING for r in caplog.records)
    time_one, calls = fake({BF16: 0.5})  # a checkpoint that records no runtime settings: probed as before
    cfg = resuming(monkeypatch, [*PRESET, f"fast_path.cache={tmp_path / 'other.json'}"], record=None)
    assert fast_path.resolve(cfg, 1, time_one).trainer["precision"] == "bf16-mixed" and calls

WARNED = "resume: trainer.precision=32-true (the checkpoint's: bf16-mixed), as the config says: the run does not go " \
    "on exactly as it started"

@pytest.mark.parametrize("given,want", [([], ("bf16-mixed", [])),  # none given: the checkpoint's
                                        (["trainer.precision=bf16"], ("bf16-mixed", [])),  # Lightning's alias
                                        (["trainer.precision=32-true"], ("32-true", [WARNED]))])
def test_a_resume_without_the_probe_keeps_the_recorded_precision_unless_given(monkeypatch, caplog, given, want):
    record = {**RECORD, "precision": "bf16-mixed", "cpu_threads": 0, "channels_last": True}  # else the defaults
    with caplog.at_level(logging.WARNING, logger="wgan_lit.fast_path"):
        out = fast_path.resolve(resuming(monkeypatch, ["trainer=cpu", *given], record), 1, lambda c: pytest.fail())
    assert (out.trainer["precision"], [r.getMessage() for r in caplog.records]) == want
    assert out.trainer["accelerator"] == "cpu"

def test_timing_a_candidate_leaves_every_rng_and_the_thread_count_as_it_found_them(tmp_path, monkeypatch):
    cfg = preset(tmp_path, "model.g_features=8", "model.d_features=8", "model.latent_dim=16", "data.batch_size=8")
    seeded: list[int] = []
    for name in ("manual_seed", "manual_seed_all"):  # where a global seed reaches CUDA's RNG
        monkeypatch.setattr(torch.cuda, name, seeded.append)
    state = lambda: (torch.get_num_threads(), torch.random.get_rng_state().tolist(), random.getstate(),
                     np.random.get_state()[1].tolist(), [s.tolist() for s in torch.cuda.get_rng_state_all()])
    before = state()
    assert fast_path.time_candidate(cfg, 1, Candidate(threads=1), iters=2, warmup=1) > 0
    assert state() == before and seeded == []  # on a CPU-only machine the only sign CUDA's RNG would be reset

@pytest.mark.parametrize("override", ["trainer.precision=32-true", "cpu_threads=1", "runtime.channels_last=false",
                                      "runtime.compile=true"])
def test_a_setting_the_probe_chooses_is_refused_when_set_by_hand_with_the_probe_on(override):
    with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}=.*fast_path.probe=false to set it yourself"):
        validate(compose_train([*PRESET, override]))
    validate(compose_train([*PRESET, "fast_path.probe=false", override]))  # control
