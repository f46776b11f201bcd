"""python -m wgan_lit.evaluate on the shared run and on e089f38's checkpoints: the table, the JSON, the run's data
section, training's ``metrics.*`` keys, and one ``Error:`` line (exit code 2) for every bad command line or file."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import LEGACY_CKPT, LEGACY_EMA_CKPT, REPO, assert_one_error, call, run_cli, tiny_classifier
from wgan_lit import classifier as clf
from wgan_lit import evaluate, fashion_mnist, metrics
from wgan_lit.config import ConfigError, DataConfig, MetricsConfig, TrainConfig, validate
from wgan_lit.evaluate import EvaluateConfig


@pytest.fixture
def args(tiny_run, tmp_path_factory, monkeypatch) -> list[str]:
    """The shared run's checkpoint, scored cheaply; its data found through the run's .hydra/config.yaml alone."""
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", [])  # no installed copy stands in
    weights = clf.save(tiny_classifier(), tmp_path_factory.mktemp("clf") / "c.pt", test_accuracy=1.0)
    return [f"checkpoint={tiny_run / 'checkpoints' / 'last.ckpt'}", f"metrics.classifier_path={weights}", "device=cpu",
            "metrics.n_samples=30", "metrics.kid_subset_size=20", "metrics.kid_subsets=5", "metrics.inception=false"]


def run(args: list[str], capsys, *extra: str) -> dict:
    code, out, err = call(evaluate.main, [*args, "json=true", *extra], capsys)
    assert code == 0, err
    return json.loads(out)


def test_help_lists_every_key_with_the_metrics_keys_and_defaults_of_training(capsys):
    code, out, err = call(evaluate.main, ["--help"], capsys)
    assert code == 0 and err == "" and "usage: python -m wgan_lit.evaluate key=value" in out
    assert re.search(r"^  checkpoint=\?\?\?  ", out, re.M) and EvaluateConfig().metrics == MetricsConfig()
    assert all(re.search(rf"^  {f.name}=", out, re.M) for f in dataclasses.fields(EvaluateConfig)[2:])
    for f in dataclasses.fields(MetricsConfig):  # nested, with MetricsConfig's defaults (their one home)
        default = str(f.default).lower() if isinstance(f.default, bool) else f.default
        assert re.search(rf"^  metrics\.{f.name}={re.escape(str(default))}(  |$)", out, re.M), f.name


def test_one_table_or_json_object_deterministic_following_the_seed_and_image_size(args, tiny_run, capsys, monkeypatch):
    code, out, err = call(evaluate.main, args, capsys)
    assert code == 0, err
    assert ("(generator step 12): 30 samples, seed 0, vs 64 real fashion_mnist test images at 28 x 28, averaged "
            "generator (EMA)") in out
    for row in ("fd_classifier", "kid", "coverage", "class Trouser"):
        assert any(re.match(rf"{row}\s+\d+\.\d{{4}}\b", line) for line in out.splitlines()), row
    assert re.search(r"^kid\s+\S+\s+lower\s+without EMA \d+\.\d{4}; \+- \d+\.\d{4} \(std over KID subsets\)$", out,
                     re.M)
    assert re.search(r"^fid_inception\s+n/a\s+lower\s+metrics.inception=false$", out, re.M)
    first = run(args, capsys)
    assert run([str(tiny_run / "checkpoints" / "last.ckpt"), *args[1:]], capsys) == first  # PATH = checkpoint=PATH
    assert set(first["metrics"]) == set(first["metrics_raw"]) == {"fd_classifier", "kid", "kid_std", "coverage"}
    assert all(v == v for v in first["metrics"].values()) and sum(first["class_fractions"].values()) == pytest.approx(1)
    assert [first[k] for k in ("gen_step", "n_real", "n_samples", "seed", "real_split")] == [12, 64, 30, 0, "test"]
    assert first["skipped"] == dict.fromkeys(("fid_inception", "kid_inception"), "metrics.inception=false")
    other = run(args, capsys, "metrics.seed=1")
    assert other["seed"] == 1 and other["metrics"] != first["metrics"]
    sizes, score = [], metrics.SampleQuality.score  # the size of the generated images each score sees
    monkeypatch.setattr(metrics.SampleQuality, "score", lambda q, fake: sizes.append(fake.shape[-1]) or score(q, fake))
    same, other = run(args, capsys, "image_size=28"), run(args, capsys, "image_size=32")
    assert [same["image_size"], other["image_size"], sizes] == [28, 32, [28, 28, 32, 32]]  # raw and averaged: 2 each
    assert same["metrics"] == first["metrics"] != other["metrics"]  # at 32 both samples and real images are resized


@pytest.mark.parametrize("ckpt", [LEGACY_CKPT, LEGACY_EMA_CKPT], ids=["plain", "averaged"])
def test_a_checkpoint_of_e089f38_is_scored(args, tiny_run, capsys, ckpt):
    result = run([f"checkpoint={ckpt}", *args[1:], f"data_root={tiny_run.parent / 'fmnist'}"], capsys)
    assert result["gen_step"] == 6 and set(result["metrics"]) == {"fd_classifier", "kid", "kid_std", "coverage"}
    assert ("metrics_raw" in result) == (ckpt == LEGACY_EMA_CKPT)


def test_the_data_section_of_the_run_and_a_data_set_this_version_lacks(args, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("data:\n  name: mnist_v9\n  root: /somewhere\n  "
                                                            "image_size: 32\n  key_of_a_later_version: 1\n")
    assert evaluate.run_data_config(ckpt, "") == DataConfig(name="mnist_v9", root="/somewhere", image_size=32)
    assert evaluate.run_data_config(ckpt, "/elsewhere").root == "/elsewhere"
    assert evaluate.run_data_config(tmp_path / "x.ckpt", "") == DataConfig()  # not in a run directory
    ckpt.parent.mkdir()
    shutil.copy(args[0].split("=", 1)[1], ckpt)
    assert_one_error(*call(evaluate.main, [*args, f"checkpoint={ckpt}"], capsys), "data.name='mnist_v9'", "celeba")


def test_every_bad_command_line_or_file_is_one_error_line_and_the_right_values_work(args, tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    ckpt, rest, junk = args[0].split("=", 1)[1], args[1:], tmp_path / "junk"
    junk.write_bytes(b"not a checkpoint")
    cases = [
        (["n_samples=30"], ["n_samples"]), (["metrics.nsamples=30"], ["nsamples"]),  # unknown keys
        (["metrics.n_samples=many"], ["metrics.n_samples=many"]), (["json=maybe"], ["json=maybe"]),  # wrong types
        (["metrics.n_samples=1"], ["metrics.n_samples=1: expected an integer >= 2"]),
        (["metrics.kid_subset_size=1"], ["metrics.kid_subset_size=1: expected an integer >= 2"]),
        (["metrics.kid_subsets=0"], ["metrics.kid_subsets=0: expected an integer >= 1"]),
        (["batch_size=0"], ["batch_size=0: expected an integer >= 1"]), (["device=tpu"], ["device='tpu'"]),
        (["image_size=30"], ["image_size=30: expected one of 0, "]),
        *([(["device=cuda"], ["device=cpu"])] if not torch.cuda.is_available() else []),
        ([f"checkpoint={tmp_path / 'none.ckpt'}"], [f"checkpoint {tmp_path / 'none.ckpt'}: no such file"]),
        ([f"checkpoint={junk}"], [f"checkpoint {junk}: not a PyTorch checkpoint"]),
        ([f"metrics.classifier_path={junk}"], [f"{junk}: not a wgan_lit classifier"])]
    for bad, fragments in cases:
        assert_one_error(*call(evaluate.main, [*args, *bad], capsys), *fragments)
    for argv, fragments in [(rest, ["checkpoint", "write checkpoint=VALUE"]), ([], ["checkpoint"]),
                            (["foo.ckpt", *rest], ["'foo.ckpt': expected key=value", "evaluate checkpoint=foo.ckpt"]),
                            ([ckpt, "foo.ckpt", *rest], ["python -m wgan_lit.evaluate checkpoint=foo.ckpt"])]:
        assert_one_error(*call(evaluate.main, argv, capsys), *fragments)
    assert_one_error(*call(evaluate.main, [*args, f"data_root={tmp_path}"], capsys), "Fashion-MNIST not found",
                     str(tmp_path), one_line=False)  # and where it looked
    assert run(args, capsys, "metrics.n_samples=2", "metrics.kid_subset_size=2", "metrics.kid_subsets=1",
               "batch_size=7", "image_size=0")["metrics"]["fd_classifier"] >= 0
    with pytest.raises(ConfigError) as in_training:  # metrics.* as training says it
        validate(OmegaConf.structured(TrainConfig(metrics=MetricsConfig(n_samples=1), trainer={"accelerator": "cpu"})))
    err = call(evaluate.main, [*args, "metrics.n_samples=1"], capsys)[2]
    assert err.removeprefix("Error: ").strip() in str(in_training.value).splitlines()


@pytest.mark.slow
def test_the_module_entry_point(args, capsys):
    assert json.loads(run_cli(["-m", "wgan_lit.evaluate", *args, "json=true"], cwd=REPO).stdout) == run(args, capsys)
