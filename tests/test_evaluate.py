"""python -m wgan_lit.evaluate: key=value overrides (``metrics.*`` as in training), the table, the JSON, the
run's data section, and one ``Error:`` line (exit code 2) for every bad command line, file or data set."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tests.conftest import REPO, assert_one_error, call, run_cli, tiny_classifier, tiny_config, write_fake_fashion_mnist
from wgan_lit import classifier as clf
from wgan_lit import evaluate, fashion_mnist
from wgan_lit.config import ConfigError, MetricsConfig, TrainConfig, validate
from wgan_lit.evaluate import EvaluateConfig
from wgan_lit.train import train


@pytest.fixture(scope="module")
def run_with_checkpoint(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, fake Fashion-MNIST with 64 test images, a tiny classifier file)."""
    tmp = tmp_path_factory.mktemp("eval")
    data = write_fake_fashion_mnist(tmp / "fmnist", n_test=64)
    train(tiny_config(data, 4, logger={}), tmp / "run")
    weights = clf.save(tiny_classifier(), tmp / "c.pt", test_accuracy=1.0)
    return tmp / "run" / "checkpoints" / "last.ckpt", data, weights


def eval_args(run_with_checkpoint) -> list[str]:
    ckpt, data, weights = run_with_checkpoint
    return [
        f"checkpoint={ckpt}",
        f"data_root={data}",
        f"metrics.classifier_path={weights}",
        "metrics.n_samples=30",
        "metrics.kid_subset_size=20",
        "metrics.kid_subsets=5",
        "metrics.inception=false",
        "device=cpu",
    ]


# ---- --help ------------------------------------------------------------------------------------------


def test_help_lists_every_key_and_the_metrics_defaults_and_exits_0(capsys):
    code, out, err = call(evaluate.main, ["--help"], capsys)
    assert code == 0 and err == ""
    assert "usage: python -m wgan_lit.evaluate key=value" in out
    for f in dataclasses.fields(EvaluateConfig):
        if f.name != "metrics":
            assert re.search(rf"^  {f.name}=", out, re.M), f.name
    for f in dataclasses.fields(MetricsConfig):  # nested, with MetricsConfig's defaults (their one home)
        default = str(f.default).lower() if isinstance(f.default, bool) else f.default
        assert re.search(rf"^  metrics\.{f.name}={re.escape(str(default))}(  |$)", out, re.M), f.name
    assert re.search(r"^  checkpoint=\?\?\?  ", out, re.M)


def test_the_metrics_keys_and_defaults_are_metrics_config_s():
    assert EvaluateConfig().metrics == MetricsConfig()
    assert not {"n_samples", "seed", "kid_subsets", "inception"} & {f.name for f in dataclasses.fields(EvaluateConfig)}


# ---- good calls --------------------------------------------------------------------------------------


def test_evaluate_prints_one_table(run_with_checkpoint, capsys):
    code, out, err = call(evaluate.main, eval_args(run_with_checkpoint), capsys)
    assert code == 0, err
    assert "(generator step 4): 30 samples, seed 0, vs 64 real fashion_mnist test images" in out
    for row in ("fd_classifier", "kid", "coverage", "class Trouser"):
        assert any(re.match(rf"{row}\s+\d+\.\d{{4}}\b", line) for line in out.splitlines()), row
    assert any(
        line.startswith("fid_inception") and "n/a" in line and "metrics.inception=false" in line
        for line in out.splitlines()
    )


def test_evaluate_json_is_deterministic_and_follows_the_seed(run_with_checkpoint, capsys):
    code, out, err = call(evaluate.main, [*eval_args(run_with_checkpoint), "json=true"], capsys)
    assert code == 0, err
    first = json.loads(out)
    assert json.loads(call(evaluate.main, [*eval_args(run_with_checkpoint), "json=true"], capsys)[1]) == first
    assert set(first["metrics"]) == {"fd_classifier", "kid", "kid_std", "coverage"}
    assert all(v == v and v >= 0 for v in first["metrics"].values())  # finite, non-negative
    assert sum(first["class_fractions"].values()) == pytest.approx(1.0)
    assert first["gen_step"] == 4 and first["n_real"] == 64 and first["n_samples"] == 30 and first["seed"] == 0
    assert first["real_split"] == "test"  # reported against the test set; training chooses by training images
    assert first["skipped"] == {"fid_inception": "metrics.inception=false", "kid_inception": "metrics.inception=false"}
    other = json.loads(call(evaluate.main, [*eval_args(run_with_checkpoint), "json=true", "metrics.seed=1"], capsys)[1])
    assert other["seed"] == 1 and other["metrics"] != first["metrics"]


def test_image_size_scores_on_another_ruler_and_the_model_s_own_size_changes_nothing(run_with_checkpoint, capsys,
                                                                                    monkeypatch):
    from wgan_lit import metrics

    sizes = []  # the size of the generated images each score sees
    score = metrics.SampleQuality.score
    monkeypatch.setattr(metrics.SampleQuality, "score",
                        lambda self, fake: sizes.append(fake.shape[-1]) or score(self, fake))

    def run(*extra: str) -> dict:
        code, out, err = call(evaluate.main, [*eval_args(run_with_checkpoint), "json=true", *extra], capsys)
        assert code == 0, err
        return json.loads(out)

    own, same, other = run(), run("image_size=28"), run("image_size=32")
    assert own["image_size"] == same["image_size"] == 28 and other["image_size"] == 32
    assert same["metrics"] == own["metrics"]  # the model's size: nothing is resized
    assert other["metrics"] != own["metrics"]  # samples and real images both resized to 32 first
    assert sizes == [28, 28, 32]


def test_evaluate_reads_the_data_section_of_the_run(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(
        "data:\n  name: fashion_mnist\n  root: /somewhere\n  image_size: 32\n  key_of_a_later_version: 1\n"
    )
    assert evaluate.run_data_config(ckpt, "").root == "/somewhere"
    assert evaluate.run_data_config(ckpt, "/elsewhere").root == "/elsewhere"
    assert evaluate.run_data_config(tmp_path / "x.ckpt", "").root == "data"  # not in a run directory


def test_evaluate_finds_the_data_through_the_run_config(run_with_checkpoint, tmp_path, monkeypatch, capsys):
    ckpt, data, _ = run_with_checkpoint
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    shutil.copy(ckpt, run / "checkpoints" / "last.ckpt")
    (run / ".hydra" / "config.yaml").write_text(f"data:\n  name: fashion_mnist\n  root: {data}\n")
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", [])  # only the run's data.root can provide it
    args = [a for a in eval_args(run_with_checkpoint) if not a.startswith(("checkpoint=", "data_root="))]
    ckpt = run / "checkpoints" / "last.ckpt"
    code, out, err = call(evaluate.main, [f"checkpoint={ckpt}", *args, "json=true"], capsys)
    assert code == 0, err
    assert json.loads(out)["n_real"] == 64


# ---- bad command lines: one Error line, exit code 2; the right value works -----------------------------


@pytest.mark.parametrize(
    ("bad", "good", "fragments"),
    [
        pytest.param(["n_samples=30"], ["metrics.n_samples=30"], ["'n_samples'", "not in 'EvaluateConfig'"],
                     id="unknown-key-old-spelling"),
        pytest.param(["metrics.nsamples=30"], ["metrics.n_samples=30"], ["'nsamples'", "MetricsConfig"],
                     id="unknown-nested-key"),
        pytest.param(["metrics.n_samples=many"], ["metrics.n_samples=31"], ["metrics.n_samples=many", "Integer"],
                     id="wrong-type-int"),
        pytest.param(["json=maybe"], ["json=true"], ["json=maybe"], id="wrong-type-bool"),
        pytest.param(["metrics.n_samples=1"], ["metrics.n_samples=2", "metrics.kid_subset_size=2"],
                     ["metrics.n_samples=1: expected an integer >= 2"], id="bad-value-n-samples"),
        pytest.param(["metrics.kid_subset_size=1"], ["metrics.kid_subset_size=10"],
                     ["metrics.kid_subset_size=1: expected an integer >= 2"], id="bad-value-kid-subset-size"),
        pytest.param(["metrics.kid_subsets=0"], ["metrics.kid_subsets=1"],
                     ["metrics.kid_subsets=0: expected an integer >= 1"], id="bad-value-kid-subsets"),
        pytest.param(["batch_size=0"], ["batch_size=7"], ["batch_size=0: expected an integer >= 1"],
                     id="bad-value-batch-size"),
        pytest.param(["device=tpu"], ["device=cpu"], ["device='tpu'"], id="bad-value-device"),
        pytest.param(["image_size=30"], ["image_size=0"], ["image_size=30: expected 0 (the model's) or one of"],
                     id="bad-value-image-size"),
    ],
)
def test_bad_value_is_one_error_line_and_the_right_one_works(run_with_checkpoint, capsys, bad, good, fragments):
    assert_one_error(*call(evaluate.main, [*eval_args(run_with_checkpoint), *bad], capsys), *fragments)
    code, out, err = call(evaluate.main, [*eval_args(run_with_checkpoint), *good], capsys)
    assert code == 0, err
    assert "fd_classifier" in out


def test_metrics_messages_are_those_of_train(run_with_checkpoint, capsys):
    _, _, err = call(evaluate.main, [*eval_args(run_with_checkpoint), "metrics.n_samples=1"], capsys)
    with pytest.raises(ConfigError) as train_err:
        validate(OmegaConf.structured(TrainConfig(metrics=MetricsConfig(n_samples=1), trainer={"accelerator": "cpu"})))
    assert err.removeprefix("Error: ").strip() in str(train_err.value).splitlines()


def test_missing_checkpoint_key_is_one_error_line(run_with_checkpoint, capsys):
    args = [a for a in eval_args(run_with_checkpoint) if not a.startswith("checkpoint=")]
    assert_one_error(*call(evaluate.main, args, capsys), "checkpoint", "write checkpoint=VALUE")
    assert_one_error(*call(evaluate.main, [], capsys), "checkpoint")
    assert call(evaluate.main, eval_args(run_with_checkpoint), capsys)[0] == 0


def test_the_checkpoint_alone_is_checkpoint_path(run_with_checkpoint, capsys):
    args = [a for a in eval_args(run_with_checkpoint) if not a.startswith("checkpoint=")]
    code, alone, err = call(evaluate.main, [str(run_with_checkpoint[0]), *args, "json=true"], capsys)
    assert code == 0, err
    assert json.loads(alone) == json.loads(call(evaluate.main, [*eval_args(run_with_checkpoint), "json=true"],
                                                capsys)[1])


def test_a_bad_bare_argument_is_one_error_line_with_the_checkpoint_command(run_with_checkpoint, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [a for a in eval_args(run_with_checkpoint) if not a.startswith("checkpoint=")]
    assert_one_error(*call(evaluate.main, ["foo.ckpt", *args], capsys),
                     "'foo.ckpt': expected key=value", "python -m wgan_lit.evaluate checkpoint=foo.ckpt")
    assert_one_error(*call(evaluate.main, [str(run_with_checkpoint[0]), "foo.ckpt", *args], capsys),
                     "python -m wgan_lit.evaluate checkpoint=foo.ckpt")  # a second, mistyped path


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_device_cuda_without_a_gpu_names_device_cpu(run_with_checkpoint, capsys):
    assert_one_error(*call(evaluate.main, [*eval_args(run_with_checkpoint), "device=cuda"], capsys), "device=cpu")


# ---- the user's files and data: one Error line, exit code 2 --------------------------------------------


def test_missing_or_bad_checkpoint_file(run_with_checkpoint, tmp_path, capsys):
    args = eval_args(run_with_checkpoint)
    none = tmp_path / "none.ckpt"
    assert_one_error(*call(evaluate.main, [*args, f"checkpoint={none}"], capsys), f"checkpoint {none}: no such file")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    assert_one_error(*call(evaluate.main, [*args, f"checkpoint={junk}"], capsys),
                     f"checkpoint {junk}: not a PyTorch checkpoint")


def test_bad_classifier_file(run_with_checkpoint, tmp_path, capsys):
    junk = tmp_path / "c.pt"
    junk.write_bytes(b"junk")
    assert_one_error(*call(evaluate.main, [*eval_args(run_with_checkpoint), f"metrics.classifier_path={junk}"], capsys),
                     f"{junk}: not a wgan_lit classifier")


def test_missing_data(run_with_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIRS", [])  # the system copy must not stand in
    code, out, err = call(evaluate.main, [*eval_args(run_with_checkpoint), f"data_root={tmp_path}"], capsys)
    assert_one_error(code, out, err, "Fashion-MNIST not found", str(tmp_path), one_line=False)  # + where it looked


def test_unknown_data_set_in_the_run_config(run_with_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(run_with_checkpoint[0], ckpt)
    (tmp_path / "run" / ".hydra").mkdir()
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text("data:\n  name: mnist_v9\n")
    args = [a for a in eval_args(run_with_checkpoint) if not a.startswith("checkpoint=")]
    assert_one_error(*call(evaluate.main, [*args, f"checkpoint={ckpt}"], capsys), "data.name='mnist_v9'",
                     "fashion_mnist")


@pytest.mark.slow
def test_the_module_entry_point(run_with_checkpoint, capsys):
    def run(*args: str) -> subprocess.CompletedProcess:
        return run_cli(["-m", "wgan_lit.evaluate", *args], cwd=REPO, check=False)

    bad = run(*eval_args(run_with_checkpoint), "metrics.kid_subset_size=1")
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr[-3000:]
    assert bad.stderr.startswith("Error: metrics.kid_subset_size=1: expected an integer >= 2")
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    good = run(*eval_args(run_with_checkpoint), "json=true")
    assert good.returncode == 0, good.stderr[-3000:]
    code, out, _ = call(evaluate.main, [*eval_args(run_with_checkpoint), "json=true"], capsys)
    assert code == 0 and json.loads(good.stdout) == json.loads(out)  # the same scores as in-process
