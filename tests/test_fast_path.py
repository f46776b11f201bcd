"""fast_path.py: the choice logic with fake timings (no timed assertions), the cache, and the config's rules."""

from __future__ import annotations

import json

import pytest

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
    assert (out.trainer["precision"], out.cpu_threads, out.model.channels_last, out.model.compile) == (
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


def test_without_the_probe_the_config_is_left_as_it_is():
    cfg = validate(compose_train(["trainer.precision=bf16-mixed"]))
    assert fast_path.resolve(cfg, channels=1, time_one=lambda c: pytest.fail("timed")) is cfg


@pytest.mark.parametrize("override", ["trainer.precision=32-true", "cpu_threads=1", "model.channels_last=false",
                                      "model.compile=true"])
def test_a_setting_the_probe_chooses_is_refused_when_set_by_hand_with_the_probe_on(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"^{key}=.*fast_path.probe=false to set it yourself"):
        validate(compose_train(["experiment=fashion_cpu_15min", override]))
    validate(compose_train(["experiment=fashion_cpu_15min", "fast_path.probe=false", override]))  # control


def test_the_probe_refuses_more_than_one_process():
    with pytest.raises(ConfigError, match="^fast_path.probe=True: .*more than one device"):
        validate(compose_train(["trainer=ddp_cpu", "fast_path.probe=true"]))
