"""wgan_lit/study.py: a tiny study end to end (arms trained, scored, reused, reported, the notebook run on it),
the committed page as the render of the committed data file, and the pieces its verdicts rest on (Spearman's
rho, the loss/score pairing, the architecture verdict, the weights at the bound)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore

from tests.conftest import assert_one_error, call, execute_notebook, tiny_classifier, write_fake_fashion_mnist
from wgan_lit import classifier as clf
from wgan_lit import study
from wgan_lit.evaluate import EvaluateConfig, evaluate
from wgan_lit.module import WGAN

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("paper_meaningful_loss.png", "paper_architectures.png", "paper_clip.png", "paper_clip_vs_gp.png")

# Six arms cover every section of the report; the other five are missing on purpose (reported as not run).
ARMS = "wgan_dcgan,wgan_mlp,gan_dcgan,gan_mlp,clip_0.1,wgan_gp"


def study_args(runs: Path, out: Path) -> list[str]:
    return [f"runs={runs}", f"out={out}", "minutes=1", f"arms={ARMS}", "metric_seconds=0.2", "n_samples=64",
            "eval_samples=64", "cpu_threads=1"]


def train_args(tmp: Path) -> list[str]:
    data = write_fake_fashion_mnist(tmp / "data", n_train=256, n_test=64)
    weights = clf.save(tiny_classifier(), tmp / "classifier.pt", test_accuracy=1.0)
    # scores at steps 0, 3, 6, 9, 12 and the loss at every step: the rho of 4 windows, whatever the clock says
    return ["--", f"data.root={data}", f"metrics.classifier_path={weights}", "max_gen_steps=12",
            "metrics.every_n_gen_steps=3", "logger.log_every_n_gen_steps=1",
            "model.g_features=8", "model.d_features=8", "model.latent_dim=16", "data.batch_size=16",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> tuple[list[str], Path, Path]:
    tmp = tmp_path_factory.mktemp("study")
    args = [*study_args(tmp / "runs", tmp / "out"), *train_args(tmp)]
    assert study.main(args) == 0
    return args, tmp / "runs", tmp / "out"


@pytest.mark.slow
def test_a_tiny_study_trains_scores_and_reports_every_chosen_arm(tiny_study):
    args, runs, out = tiny_study
    for arm in ARMS.split(","):
        ev = json.loads((runs / arm / "evaluate.json").read_text())
        assert ev["gen_step"] == 12 and ev["n_samples"] == 64
        curves = study.scalars(runs / arm)
        assert len(curves["metrics/fd_classifier"]) >= 5  # at steps 0, 3, 6, 9, 12 (and on the clock)
    # the final score used the classifier the arms were given (-- metrics.classifier_path=), not the default
    given = next(w.split("=", 1)[1] for w in args if w.startswith("metrics.classifier_path="))
    other = clf.save(tiny_classifier(seed=1), runs.parent / "other.pt", test_accuracy=1.0)
    scores = {}
    for weights in (given, other):
        cfg = EvaluateConfig(checkpoint=str(runs / "wgan_gp" / "checkpoints" / "last.ckpt"))
        cfg.metrics.n_samples, cfg.metrics.inception, cfg.metrics.classifier_path = 64, False, str(weights)
        scores[weights] = evaluate(cfg)["metrics"]["fd_classifier"]
    reported = json.loads((runs / "wgan_gp" / "evaluate.json").read_text())["metrics"]["fd_classifier"]
    assert reported == scores[given] != scores[other]
    page = (out / "paper.md").read_text()
    for name in FIGURES:
        assert (out / name).stat().st_size > 1000 and f"({name})" in page
    ev = json.loads((runs / "wgan_gp" / "evaluate.json").read_text())["metrics"]
    assert f"| {ev['fd_classifier']:.1f} | {ev['coverage']:.3f} |" in page  # the table holds the arm's scores
    assert "| WGAN, no BatchNorm | not run |" in page and "| GAN, no BatchNorm | not run |" in page
    assert "Robustness" in page and "not measured (arms missing)." in page  # two architectures are missing
    assert "| 0.1 | clip_0.1 |" in page and "| 0.005 |" not in page
    rho = re.search(r"\| wgan_dcgan \| W estimate \| (\S+) \|", page).group(1)
    assert -1 <= float(rho) <= 1 and f"(rho {rho}" in page  # 4 scores after the first: a verdict, not "too few"
    assert "python -m wgan_lit.study runs=RUNS out=OUT minutes=1" in page and "-- data.root=ROOT" in page
    data = (out / "paper_data.json").read_text()
    tmp = str(runs.parent)
    assert tmp in " ".join(args) and tmp not in page and tmp not in data  # no folder of this machine in either
    arms = json.loads(data)["arms"]
    assert arms["wgan_gp"]["scores"]["fd_classifier"] == pytest.approx(ev["fd_classifier"], rel=1e-5)
    assert len(arms["wgan_gp"]["loss_vs_fd"]["step"]) >= 4 and "samples" not in arms["wgan_gp"]
    assert arms["wgan_mlp"]["samples"]["shape"] == [36, 1, 28, 28]  # the architecture arms' sample grids


@pytest.mark.slow
def test_a_render_of_the_data_file_alone_is_the_page(tiny_study, tmp_path):
    _, runs, out = tiny_study
    shutil.copy(out / "paper_data.json", tmp_path / "data.json")
    moved = runs.with_name("runs_moved")  # the run directories out of reach: the render reads the data file only
    runs.rename(moved)
    try:
        assert study.main([f"render={tmp_path / 'data.json'}", f"out={tmp_path / 'again'}"]) == 0
    finally:
        moved.rename(runs)
    assert (tmp_path / "again" / "paper.md").read_bytes() == (out / "paper.md").read_bytes()
    assert all((tmp_path / "again" / name).stat().st_size > 1000 for name in FIGURES)
    assert not (tmp_path / "again" / "paper_data.json").exists()


def test_the_committed_page_is_the_render_of_the_committed_data(tmp_path):
    data = REPO / "docs" / "paper_data.json"
    assert data.stat().st_size < 1_000_000
    assert study.main([f"render={data}", f"out={tmp_path}"]) == 0
    assert (tmp_path / "paper.md").read_bytes() == (REPO / "docs" / "paper.md").read_bytes()
    assert all((tmp_path / name).stat().st_size > 1000 for name in FIGURES)


def test_a_file_that_is_not_study_data_is_refused_before_anything_is_written(capsys, tmp_path):
    (tmp_path / "bad.json").write_text('{"arms": {}}')
    for path in (tmp_path / "bad.json", tmp_path / "missing.json"):
        code, out, err = call(study.main, [f"render={path}", f"out={tmp_path / 'out'}"], capsys)
        assert_one_error(code, out, err, f"render='{path}'")
    assert not (tmp_path / "out").exists()


def test_the_share_at_the_bound_counts_the_critic_parameters_not_its_running_statistics():
    model = WGAN()  # the DCGAN critic with BatchNorm, the paper's c = 0.01
    with torch.no_grad():
        for p in model.critic.parameters():
            p.fill_(0.01)
        for b in model.critic.buffers():
            if b.is_floating_point():
                b.fill_(0.001)  # well inside the bound: counted as weights, they would lower the share
    weights = study.critic_weights(model, 0.01)
    assert weights["at_bound"] == 1.0
    assert sum(weights["hist"]) == sum(p.numel() for p in model.critic.parameters()) == weights["hist"][-1]
    with torch.no_grad():
        next(model.critic.parameters()).fill_(0.0)  # control: weights inside the bound lower it
    assert study.critic_weights(model, 0.01)["at_bound"] < 1.0


@pytest.mark.slow
def test_finished_arms_are_reused_and_changed_ones_retrained(tiny_study, tmp_path, monkeypatch, capsys):
    args, study_runs, _ = tiny_study
    runs = tmp_path / "runs"  # a copy: the control below deletes the arm's run
    shutil.copytree(study_runs / "wgan_gp", runs / "wgan_gp")
    trained = []
    monkeypatch.setattr(study.subprocess, "call", lambda cmd, **kw: trained.append(cmd) or 1)
    cfg = study.StudyConfig(runs=str(runs), minutes=1, arms=ARMS, metric_seconds=0.2, n_samples=64,
                            eval_samples=64, cpu_threads=1)
    extra = args[args.index("--") + 1:]
    assert study.run_arm("wgan_gp", cfg, extra) == runs / "wgan_gp"
    assert trained == [] and "wgan_gp: finished before, reused" in capsys.readouterr().out
    # control: another setting is another run, trained again (the stub fails it, so it stops there)
    with pytest.raises(SystemExit):
        study.run_arm("wgan_gp", cfg, [*extra, "model.gp_weight=5"])
    assert len(trained) == 1 and "model.gp_weight=5" in trained[0]
    assert not (runs / "wgan_gp" / "done.json").exists()  # the other settings' run is not reported as done


@pytest.mark.slow
def test_the_paper_notebook_runs_top_to_bottom_on_the_tiny_study(tiny_study, tmp_path, monkeypatch):
    _, runs, _ = tiny_study
    outputs = execute_notebook("paper_study.ipynb", tmp_path, monkeypatch, WGAN_STUDY_DIR=str(runs))
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        o.get("data", {}).get("text/plain", "") for o in outputs)
    assert f"study: {runs}: 6 finished arms" in text
    assert re.search(r"wgan_gp\s+12\s", text)  # the arm table: generator steps of each arm
    assert [m for o in outputs for m in o.get("data", {})].count("image/png") == 5


@pytest.mark.slow
def test_the_paper_notebook_draws_the_committed_data_without_a_study_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WGAN_STUDY_DIR", raising=False)
    outputs = execute_notebook("paper_study.ipynb", tmp_path, monkeypatch)
    text = "".join(o.get("text", "") for o in outputs)
    n = len(json.loads((REPO / "docs" / "paper_data.json").read_text())["arms"])
    assert f"paper_data.json: {n} finished arms" in text
    assert [m for o in outputs for m in o.get("data", {})].count("image/png") == 5


def test_spearman_is_rank_correlation():
    assert study.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1)
    assert study.spearman([1, 2, 3, 4], [9, 7, 5, 1]) == pytest.approx(-1)
    assert study.spearman([1, 2, 3, 4], [1, 100, 1000, 10000]) == pytest.approx(1)  # ranks, not values
    # 1 - 6 * sum(d^2) / (n (n^2 - 1)) with ranks (1,2,3,4,5) vs (2,1,4,3,5): d^2 sums to 4 -> 0.8
    assert study.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert math.isnan(study.spearman([1, 2], [2, 1]))


def test_the_loss_is_averaged_over_the_log_points_since_the_previous_score():
    curves = {"metrics/fd_classifier": [(0, 0, 300.0), (1, 10, 200.0), (2, 20, 100.0)],
              "critic/wasserstein": [(0, s, float(s)) for s in range(0, 21, 5)]}
    steps, losses, fds = study.loss_vs_quality(curves, "critic/wasserstein")
    assert steps == [10, 20] and fds == [200.0, 100.0]
    assert losses == [7.5, 17.5]  # (5 + 10) / 2 and (15 + 20) / 2; the step-0 loss belongs to no window


def test_the_architecture_verdict_compares_the_worst_arms():
    cov = dict.fromkeys([f"{loss}_{a}" for loss in ("wgan", "gan") for a in study.ARCHITECTURES], 0.99)
    fd = {"wgan_dcgan": 100, "wgan_nobn": 120, "wgan_mlp": 150, "gan_dcgan": 80, "gan_nobn": 300, "gan_mlp": 700}
    text = study.robustness(fd, cov)
    assert "the worst WGAN arm scored 150.0" in text and "WGAN was the more robust, as the paper says." in text
    assert "with the DCGAN generator(s)" in text  # where the GAN did better, it says so
    flipped = {**fd, "wgan_mlp": 900}
    assert "the claim did not hold." in study.robustness(flipped, cov)
    assert study.robustness({k: v for k, v in fd.items() if k != "gan_mlp"}, cov) == "not measured (arms missing)."


def test_a_rho_without_enough_scores_is_not_called_a_missing_arm():
    results = {"wgan_dcgan": {}}
    assert "fewer than 3 scores" in study._rho_verdict(math.nan, False, "wgan_dcgan", results, "yes", "no")
    assert "gan_dcgan missing" in study._rho_verdict(math.nan, False, "gan_dcgan", results, "yes", "no")
    assert study._rho_verdict(0.9, True, "wgan_dcgan", results, "yes", "no") == "yes"
    assert study._rho_verdict(0.1, False, "wgan_dcgan", results, "yes", "no") == "no"


def test_the_metrics_classifier_is_built_before_the_first_arm_not_in_its_budget(tmp_path, monkeypatch):
    store = ConfigStore.instance()  # as in a fresh process: the train schema not yet registered
    monkeypatch.setattr(store, "repo", {k: v for k, v in store.repo.items() if k != "train_schema.yaml"})
    events = []
    monkeypatch.setattr(clf, "load_or_build", lambda path, root, **kw: events.append(("classifier", path, root)))
    monkeypatch.setattr(study.subprocess, "call", lambda cmd, **kw: events.append(("train",)) or 1)  # fails the arm
    with pytest.raises(SystemExit):
        study.main([f"runs={tmp_path}", "arms=wgan_gp", "--", "data.root=/data", "metrics.classifier_path=/c.pt"])
    assert events == [("classifier", "/c.pt", "/data"), ("train",)]


def test_bad_study_keys_are_refused_before_training(capsys, tmp_path):
    code, out, err = call(study.main, [f"runs={tmp_path}", "arms=wgan_dcgan,wgan_huge", "minutes=0"], capsys)
    assert_one_error(code, out, err, "arms=", "wgan_huge", "minutes=0", one_line=False)
    assert not list(tmp_path.iterdir())  # nothing was trained or written
