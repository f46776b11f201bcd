"""hydra/sweeper=optuna over train's task: its configured objective, failed trials, Optuna's override grammar."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import TINY_ARGS, compose_train, run_cli, write_fake_fashion_mnist
from wgan_lit import cli, train
from wgan_lit.config import ConfigError, validate


def test_the_objective_is_the_final_metric_else_the_critic_estimate():
    metrics = {"W": 0.25, "metrics/fd_classifier": 31.5, "metrics/kid": 0.02}
    for overrides, computed, expected in [([], metrics, ("metrics/fd_classifier", 31.5)),
                                          (["objective=kid"], metrics, ("metrics/kid", 0.02)),
                                          (["objective=W"], metrics, ("W", 0.25)),
                                          ([], {"W": 0.25}, ("W", 0.25)),  # metrics off: the documented fallback
                                          (["model=gan"], {"JS": 0.5}, ("JS", 0.5))]:
        assert train.objective_value(validate(compose_train(overrides)), computed) == expected
    for computed in ({}, {"W": float("nan")}):  # nothing (or NaN) logged: None, a failed trial (NaN ends the sweep)
        assert train.objective_value(validate(compose_train([])), computed) == ("W", None)
    for bad in ("coverage", "nope"):  # coverage is maximised: the sweep minimises
        with pytest.raises(ConfigError, match=f"objective='{bad}': expected one of fd_classifier, kid, .*W, JS$"):
            validate(compose_train([f"objective={bad}"]))


def test_the_command_line_check_takes_optunas_grammar():
    cli.check_train_command_line(["-m", "experiment=tune_fashion", "model.lr_d=tag(log,interval(1e-5,1e-3))",
                                  "model.n_critic=range(1,4)", "model.clip_value=interval(0.005,0.05)",
                                  "data.batch_size=choice(16,32)", "seed=1,2"], train.check_before_run, train.BAD_INPUT)
    sweeper = compose_train(["experiment=tune_fashion"], hydra=True).hydra.sweeper
    assert (sweeper.direction, sweeper.max_failure_rate, sorted(sweeper.params)) == ("minimize", 1.0, [
        "data.batch_size", "model.clip_value", "model.lr_d", "model.lr_g", "model.n_critic"])


# train's main() as `python -m wgan_lit.train` runs it, keeping the study Optuna's sweeper creates (an sqlite
# storage would do, but optuna 2.10's fails with SQLAlchemy 2): each trial's state, value and parameters.
RECORDER = """
import json, sys, optuna
from wgan_lit import train
studies, create = [], optuna.create_study
optuna.create_study = lambda **kw: studies.append(create(**kw)) or studies[-1]
sys.argv = ["train", *sys.argv[1:]]
try:
    train.main()
finally:
    trials = [[t.number, t.state.name, t.value, t.params] for s in studies for t in s.trials]
    json.dump(trials, open("trials.json", "w"))
"""


def test_three_trials_one_refused_the_best_is_the_best_returned(tmp_path):
    data, sweep = write_fake_fashion_mnist(tmp_path / "fmnist"), tmp_path / "sweep"
    # TPE's seed 7 draws n_critic 1, 0, 2 (optuna 2.10): the middle trial is refused by its check, the last still runs.
    run_cli(["-c", RECORDER, "-m", "hydra/sweeper=optuna", *[a for a in TINY_ARGS if "n_critic" not in a],
             f"data.root={data}", "max_gen_steps=3", "logger=csv", "logger.timelapse=false",
             "logger.sample_every_n_gen_steps=0", "logger.log_every_n_gen_steps=1", "checkpoint_every_n_gen_steps=0",
             "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=7", f"hydra.sweep.dir={sweep}",
             "model.n_critic=choice(0,1,2)", "model.lr_d=tag(log,interval(1e-5,1e-3))"], cwd=tmp_path)
    trials = json.loads((tmp_path / "trials.json").read_text())
    states = {n: state for n, state, _, _ in trials}  # failed: exactly the trial whose value its check refused
    assert states == {n: "FAIL" if params["model.n_critic"] == 0 else "COMPLETE" for n, _, _, params in trials}
    assert list(states.values()).count("FAIL") == 1 and len(trials) == 3, trials
    logs = {n: (sweep / str(n) / "train.log").read_text() for n, *_ in trials}
    done = [(value, params) for n, state, value, params in trials if state == "COMPLETE"]
    for n, state, value, _ in trials:  # Optuna's value is the one the job logged (the fallback W: metrics off)
        if state == "FAIL":
            assert "Error: model.n_critic=0: expected an integer >= 1" in logs[n] and value is None
        else:
            assert value == float(re.findall(r"Objective \(minimised\): W=(\S+)", logs[n])[-1])
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert (results["best_value"], results["best_params"]) == min(done, key=lambda d: d[0])
