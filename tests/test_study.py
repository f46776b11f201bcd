"""wgan_lit/study.py: a one-arm study end to end, the page as the render of its data, verdicts that flip with it."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore

from tests import conftest
from tests.conftest import TINY_ARGS, assert_one_error, call, execute_notebook, tiny_classifier
from wgan_lit import classifier as clf
from wgan_lit import study
from wgan_lit.config import MetricsConfig
from wgan_lit.evaluate import EvaluateConfig, evaluate

DOCS = Path(__file__).resolve().parents[1] / "docs"
DATA = json.loads((DOCS / "paper_data.json").read_text())
FIGURES = ("paper_meaningful_loss.png", "paper_architectures.png", "paper_clip.png", "paper_clip_vs_gp.png")

@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory) -> tuple[list[str], Path, Path]:
    tmp = tmp_path_factory.mktemp("study")  # wgan_dcgan: an architecture arm, and c = 0.01 of the clip arms
    weights = clf.save(tiny_classifier(), tmp / "c.pt", test_accuracy=1.0)
    # scores at steps 0, 3, 6, 9, 12 and the loss at every step: the rho of 4 windows, whatever the clock says
    args = [f"runs={tmp / 'runs'}", f"out={tmp / 'out'}", "minutes=1", "arms=wgan_dcgan", "metric_seconds=0.2",
            "n_samples=64", "eval_samples=64", "cpu_threads=1", "--",
            f"data.root={conftest.write_fake_fashion_mnist(tmp / 'data')}", f"metrics.classifier_path={weights}",
            *TINY_ARGS, "max_gen_steps=12", "metrics.every_n_gen_steps=3", "logger.log_every_n_gen_steps=1"]
    assert study.main(args) == 0
    return args, tmp / "runs", tmp / "out"

@pytest.mark.slow
def test_a_tiny_study_trains_scores_reports_reuses_and_renders_from_its_data_alone(tiny_study, tmp_path, monkeypatch,
                                                                                   capsys):
    args, runs, out = tiny_study
    ev, ckpt = json.loads((runs / "wgan_dcgan" / "evaluate.json").read_text()), runs / "wgan_dcgan" / "checkpoints"
    assert ev["gen_step"] == 12 and ev["n_samples"] == 64
    assert len(study.scalars(runs / "wgan_dcgan")["metrics/fd_classifier"]) >= 5  # steps 0, 3, 6, 9, 12 (+ clock)
    score = lambda w: evaluate(EvaluateConfig(str(ckpt / "last.ckpt"), metrics=MetricsConfig(
        n_samples=64, inception=False, classifier_path=str(w))))["metrics"]
    given = next(w.split("=", 1)[1] for w in args if w.startswith("metrics.classifier_path="))  # not the default
    other = clf.save(tiny_classifier(seed=1), tmp_path / "other.pt", test_accuracy=1.0)
    assert ev["metrics"]["fd_classifier"] == score(given)["fd_classifier"] != score(other)["fd_classifier"]
    page, data = (out / "paper.md").read_text(), (out / "paper_data.json").read_text()
    assert all((out / name).stat().st_size > 1000 and f"({name})" in page for name in FIGURES)
    assert f"| WGAN, DCGAN | {ev['metrics']['fd_classifier']:.1f} | {ev['metrics']['coverage']:.3f} |" in page
    rho = re.search(r"\| wgan_dcgan \| W estimate \| (\S+) \|", page).group(1)
    assert -1 <= float(rho) <= 1 and f"(rho {rho}" in page  # 4 scores after the first: a verdict, not "too few"
    assert "python -m wgan_lit.study runs=RUNS out=OUT minutes=1" in page and "-- data.root=ROOT" in page
    assert str(runs.parent) not in page + data and "| 0.01 | wgan_dcgan |" in page  # no folder of this machine
    arm = json.loads(data)["arms"]["wgan_dcgan"]
    assert arm["scores"]["fd_classifier"] == pytest.approx(ev["metrics"]["fd_classifier"], rel=1e-5, abs=1e-9)
    assert len(arm["loss_vs_fd"]["step"]) >= 4 and arm["samples"]["shape"] == [36, 1, 28, 28] and 0 < arm[
        "critic_weights"]["at_bound"] <= 1 and sum(arm["critic_weights"]["hist"]) > 0  # an architecture and clip arm
    assert not {"samples", "critic_weights"} & study.arm_data("wgan_gp", runs / "wgan_dcgan").keys()  # neither arm
    assert study.arm_data("gan_mlp", runs / "wgan_dcgan")["loss"]["tag"] == "critic/js_estimate"
    shutil.copytree(runs / "wgan_dcgan", tmp_path / "wgan_dcgan")  # finished: reused; other settings: trained again
    trained, extra, cfg = [], args[args.index("--") + 1:], study.StudyConfig(
        runs=str(tmp_path), minutes=1, metric_seconds=0.2, n_samples=64, eval_samples=64, cpu_threads=1)
    monkeypatch.setattr(study.subprocess, "call", lambda cmd, **kw: trained.append(cmd) or 1)  # fails the arm
    assert study.run_arm("wgan_dcgan", cfg, extra) == tmp_path / "wgan_dcgan" and trained == []
    assert "wgan_dcgan: finished before, reused" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        study.run_arm("wgan_dcgan", cfg, [*extra, "model.clip_value=0.02"])
    assert len(trained) == 1 and "model.clip_value=0.02" in trained[0]
    assert not (tmp_path / "wgan_dcgan" / "done.json").exists()  # the other settings' run is not reported as done
    runs.rename(runs.with_name("moved"))  # the run directories out of reach: the render reads the data file only
    try:
        assert study.main([f"render={out / 'paper_data.json'}", f"out={tmp_path / 'again'}"]) == 0
    finally:
        runs.with_name("moved").rename(runs)
    again = tmp_path / "again"
    assert (again / "paper.md").read_bytes() == (out / "paper.md").read_bytes()
    assert all((again / name).stat().st_size > 1000 for name in FIGURES) and not (again / "paper_data.json").exists()

def flipped(**changes) -> str:
    """The committed data's page with arms removed (None), other fd_classifier scores or other (loss, fd) pairs."""
    data = json.loads(json.dumps(DATA))
    for arm, change in changes.items():
        if change is None:
            del data["arms"][arm]
        elif isinstance(change, tuple):
            data["arms"][arm]["loss_vs_fd"] = {"step": list(range(len(change[0]))), "loss": change[0], "fd": change[1]}
        else:
            data["arms"][arm]["scores"]["fd_classifier"] = change
    return study.page(data)

def test_the_committed_page_is_the_render_of_the_committed_data_and_its_verdicts_flip_with_it(tmp_path):
    assert (DOCS / "paper_data.json").stat().st_size < 1_000_000
    assert study.main([f"render={DOCS / 'paper_data.json'}", f"out={tmp_path}"]) == 0
    assert (tmp_path / "paper.md").read_text() == (DOCS / "paper.md").read_text() == (page := flipped())
    assert all((tmp_path / name).stat().st_size > 1000 for name in FIGURES)
    assert "did not track quality well here (rho 0.30 <= 0.5)" in page and "too (rho -0.82, |rho| >= 0.5)" in page
    assert "the worst WGAN arm scored 742.6 (lowest coverage 0.115), the worst GAN arm 755.8" in page
    assert "WGAN was the more robust, as the paper says." in page and "weight clipping reached the better" in page
    assert "c = 0.01 scored best (200.3); 29 % of the critic's weights sat at the bound at the most (c = 0.005), " \
           "9 % at the least (c = 0.1)." in page
    up, mixed = ([1.0, 2, 3, 4], [1.0, 2, 3, 4]), ([1.0, 2, 3, 4, 5], [2.0, 5, 3, 1, 4])  # rho 1 and 0
    page = flipped(wgan_dcgan=up, gan_dcgan=mixed, wgan_mlp=900.0, **{"clip_0.1": 10.0}, wgan_gp=1.0)
    assert "the W estimate tracked quality (rho 1.00 > 0.5)" in page and "did not (rho 0.00), as the paper" in page
    assert "the claim did not hold." in page and "c = 0.1 scored best (10.0)" in page
    assert "Here: the gradient penalty reached the better score in the same time" in page
    assert "with the DCGAN generator(s)" in flipped(gan_dcgan=100.0)  # where the GAN did better, it says so
    page = flipped(wgan_dcgan=([1.0, 2], [2.0, 1]), gan_dcgan=None, gan_mlp=None, **{"clip_0.005": None})
    assert "not measured (wgan_dcgan has fewer than 3 scores" in page and "(gan_dcgan missing)" in page
    assert page.count("not measured (arms missing).") == 1 and "| GAN, MLP (4 x 512) | not run | | | |" in page
    assert "| 0.005 |" not in page and "| 0.001 | clip_0.001 |" in page  # a row per clip arm there is
    assert flipped(**dict.fromkeys(study.CLIP_ARMS.values())).count("not measured (arms missing).") == 3  # + GP

@pytest.mark.parametrize("case", ["not data", "missing", "bad keys"])
def test_bad_input_is_one_error_and_nothing_is_written(case, capsys, tmp_path):
    (tmp_path / "not data").write_text('{"arms": {}}')
    args = [f"runs={tmp_path / 'runs'}", "arms=wgan_dcgan,wgan_huge", "minutes=0"] if case == "bad keys" else [
        f"render={tmp_path / case}", f"out={tmp_path / 'out'}"]
    fragments = ("arms=", "wgan_huge", "minutes=0") if case == "bad keys" else (f"render='{tmp_path / case}'",)
    assert_one_error(*call(study.main, args, capsys), *fragments, one_line=case != "bad keys")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not data"]  # nothing trained or written

def test_the_share_at_the_bound_counts_the_critic_parameters_not_its_running_statistics(tiny_model):
    critic = tiny_model.critic  # the DCGAN critic, with BatchNorm
    with torch.no_grad():
        for t in [*critic.parameters(), *(b for b in critic.buffers() if b.is_floating_point())]:
            t.fill_(0.01 if isinstance(t, torch.nn.Parameter) else 0.001)  # buffers counted would lower the share
        w = study.critic_weights(tiny_model, 0.01)
        assert w["at_bound"] == 1.0 and sum(w["hist"]) == sum(p.numel() for p in critic.parameters()) == w["hist"][-1]
        next(critic.parameters()).fill_(0.0)  # control: weights inside the bound lower it
        assert study.critic_weights(tiny_model, 0.01)["at_bound"] < 1.0

def test_the_metrics_classifier_is_built_before_the_first_arm_not_in_its_budget(tmp_path, monkeypatch):
    store, events = ConfigStore.instance(), []  # as in a fresh process: the train schema not yet registered
    monkeypatch.setattr(store, "repo", {k: v for k, v in store.repo.items() if k != "train_schema.yaml"})
    monkeypatch.setattr(clf, "load_or_build", lambda path, root, **kw: events.append(("classifier", path, root)))
    monkeypatch.setattr(study.subprocess, "call", lambda cmd, **kw: events.append(("train",)) or 1)  # fails the arm
    with pytest.raises(SystemExit):
        study.main([f"runs={tmp_path}", "arms=wgan_gp", "--", "data.root=/data", "metrics.classifier_path=/c.pt"])
    assert events == [("classifier", "/c.pt", "/data"), ("train",)]

@pytest.mark.slow
@pytest.mark.parametrize("from_runs", [True, False])
def test_the_paper_notebook_runs_on_a_study_or_the_committed_data(from_runs, tiny_study, tmp_path, monkeypatch):
    monkeypatch.delenv("WGAN_STUDY_DIR", raising=False)
    env = {"WGAN_STUDY_DIR": str(tiny_study[1])} if from_runs else {}
    outputs = execute_notebook("paper_study.ipynb", tmp_path, monkeypatch, **env)
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    assert (f"study: {tiny_study[1]}: 1 finished arms" if from_runs else f"json: {len(DATA['arms'])} finished") in text
    assert re.search(rf"wgan_dcgan\s+{12 if from_runs else 825}\s", text)  # the arm table's generator steps
    assert [m for o in outputs for m in o.get("data", {})].count("image/png") == 5

def test_spearman_is_rank_correlation_and_the_loss_is_averaged_since_the_previous_score():
    # ranks, not values; 1 - 6 sum(d^2) / (n (n^2 - 1)) of ranks 1..5 and (2, 1, 4, 3, 5): sum(d^2) = 4 -> 0.8
    pairs = [([10, 20, 30, 40], 1), ([1, 100, 1000, 10000], 1), ([9, 7, 5, 1], -1), ([2, 1, 4, 3, 5], 0.8)]
    assert [study.spearman(list(range(len(y))), y) for y, _ in pairs] == pytest.approx([r for _, r in pairs])
    assert study.spearman([1, 2], [2, 1]) != study.spearman([1, 2], [2, 1])  # nan below 3 points
    curves = {"metrics/fd_classifier": [(0, 0, 300.0), (1, 10, 200.0), (2, 20, 100.0)],
              "critic/wasserstein": [(0, s, float(s)) for s in range(0, 21, 5)]}
    # (5 + 10) / 2 and (15 + 20) / 2; the step-0 loss belongs to no window
    assert study.loss_vs_quality(curves, "critic/wasserstein") == ([10, 20], [7.5, 17.5], [200.0, 100.0])
