"""Sample-quality metrics: sanity on real data, determinism, the training callback, the evaluate command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from tests.conftest import REPO, TINY, RandomImages, tiny_classifier, tiny_trainer, write_fake_fashion_mnist
from wgan_lit import classifier as clf
from wgan_lit.fashion_mnist import SYSTEM_DIRS, load_fashion_mnist, locate_fashion_mnist
from wgan_lit.metrics import (
    SampleQuality,
    SampleQualityCallback,
    best_checkpoint,
    find_inception_weights,
    normalized_entropy,
)
from wgan_lit.module import WGAN

REAL = SYSTEM_DIRS[0]
needs_real = pytest.mark.skipif(
    not REAL.is_dir(), reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist"
)


def random_uint8(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


# ---- real data: the metrics measure what they claim ----------------------------------------------------


@pytest.fixture(scope="module")
def real_fmnist():
    """Real train and test images, and a classifier trained in seconds on a subset (`python -m
    wgan_lit.classifier` trains the shipped one on all of it)."""
    train_x, train_y = load_fashion_mnist(*locate_fashion_mnist(REAL, "train"))
    test_x, test_y = load_fashion_mnist(*locate_fashion_mnist(REAL, "test"))
    model = clf.train_classifier(train_x[:12000], train_y[:12000], epochs=2, batch_size=256, width=16)
    return train_x, test_x, test_y, model


@pytest.fixture(scope="module")
def train_stats(real_fmnist):
    """Scores against real *training* statistics, so the real test set is an unseen sample of the same law."""
    train_x, _, _, model = real_fmnist
    return SampleQuality(train_x[-10000:], model, kid_subsets=20, kid_subset_size=500)


@pytest.mark.real_data
@needs_real
def test_quickly_trained_classifier_is_already_accurate(real_fmnist):
    _, test_x, test_y, model = real_fmnist
    assert clf.accuracy(model, test_x, test_y) > 0.8


@pytest.mark.real_data
@needs_real
def test_real_test_images_score_near_zero_with_full_coverage_and_noise_scores_far(real_fmnist, train_stats):
    _, test_x, _, _ = real_fmnist
    real = train_stats.score(test_x)
    assert real["coverage"] > 0.97  # the test set is balanced: 1000 images per class
    assert all(0.07 < f < 0.13 for f in train_stats.class_fractions), train_stats.class_fractions
    noise = train_stats.score(random_uint8(2000))
    assert real["fd_classifier"] < 0.02 * noise["fd_classifier"]
    assert abs(real["kid"]) < 0.01 * noise["kid"]
    assert noise["coverage"] < 0.5  # noise is not spread over the classes like clothing is


@pytest.mark.real_data
@needs_real
def test_a_generator_of_one_image_has_zero_coverage_and_a_large_distance(real_fmnist, train_stats):
    _, test_x, _, _ = real_fmnist
    one = train_stats.score(test_x[:1].expand(2000, -1, -1, -1))
    assert one["coverage"] < 0.05
    assert max(train_stats.class_fractions) == 1.0
    varied = train_stats.score(test_x[:2000])
    assert one["fd_classifier"] > 10 * varied["fd_classifier"]


@pytest.mark.real_data
@needs_real
def test_a_generator_of_half_the_classes_has_lower_coverage(real_fmnist, train_stats):
    _, test_x, test_y, _ = real_fmnist
    half = train_stats.score(test_x[test_y < 5])
    assert 0.6 < half["coverage"] < 0.8  # log 5 / log 10 = 0.70 for five equal classes


@pytest.mark.real_data
@needs_real
def test_float_images_in_minus1_1_score_as_their_uint8_originals(real_fmnist, train_stats):
    _, test_x, _, _ = real_fmnist
    as_float = test_x[:1000].float() / 127.5 - 1
    assert train_stats.score(as_float) == train_stats.score(test_x[:1000])


# ---- determinism and the pieces, on synthetic data -------------------------------------------------------


def test_normalized_entropy():
    assert normalized_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)
    assert str(normalized_entropy(torch.tensor([0, 7, 0, 0]))) == "0.0"
    assert normalized_entropy(torch.tensor([1, 1, 0, 0])) == pytest.approx(0.5)


def test_scores_are_deterministic_for_a_seed_and_leave_the_global_rng_alone():
    real, fake = random_uint8(300, seed=1), random_uint8(200, seed=2)
    a = SampleQuality(real, tiny_classifier(), kid_subsets=10, kid_subset_size=50, seed=3)
    b = SampleQuality(real, tiny_classifier(), kid_subsets=10, kid_subset_size=50, seed=3)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = a.score(fake)
    assert torch.equal(torch.get_rng_state(), state)  # KID's subsets come from a private seed
    assert a.score(fake) == first == b.score(fake)
    assert set(first) == {"fd_classifier", "kid", "kid_std", "coverage"}
    other_seed = SampleQuality(real, tiny_classifier(), kid_subsets=10, kid_subset_size=50, seed=4).score(
        fake
    )
    assert other_seed["kid"] != first["kid"] and other_seed["fd_classifier"] == first["fd_classifier"]


def test_classifier_features_are_used_in_inference_mode():
    model = tiny_classifier()
    scorer = SampleQuality(random_uint8(50), model, kid_subsets=2, kid_subset_size=10)
    first = scorer.score(random_uint8(40, seed=5))
    for fid, kid in scorer.pairs.values():
        fid.train(), kid.train()  # e.g. a parent module switching to training mode
    assert not model.training
    assert scorer.score(random_uint8(40, seed=5)) == first


def test_score_compares_against_the_real_images_given():
    scorer = SampleQuality(random_uint8(200, seed=1), tiny_classifier(), kid_subsets=5, kid_subset_size=50)
    same_law = scorer.score(random_uint8(200, seed=2))["fd_classifier"]
    dark = scorer.score(random_uint8(200, seed=2) // 8)["fd_classifier"]
    assert dark > 10 * same_law


def test_missing_inception_weights_are_reported_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path, why = find_inception_weights("")
    assert path is None and ("torch-fidelity is not installed" in why or "torch hub cache" in why)
    path, why = find_inception_weights(str(tmp_path / "nope.pth"))
    assert path is None and ("nope.pth" in why or "torch-fidelity is not installed" in why)
    assert not (tmp_path / "torch").exists()


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised Inception-v3 in torch-fidelity's weight format: the real loading code runs."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    path = tmp_path_factory.mktemp("inception") / "weights.pth"
    torch.save({}, path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path))
    torch.save(net.state_dict(), path)
    return path


def test_inception_metrics_when_weights_are_on_disk(random_inception_weights):
    path, why = find_inception_weights(str(random_inception_weights))
    assert path == random_inception_weights and why == ""
    # The 64-d layer: the same loading and plumbing as the standard 2048-d one, at a fraction of the CPU time.
    scorer = SampleQuality(
        random_uint8(4, seed=1),
        None,
        inception_weights=path,
        kid_subsets=2,
        kid_subset_size=3,
        inception_dims=64,
    )
    scores = scorer.score(random_uint8(4, seed=2))
    assert set(scores) == {"fid_inception", "kid_inception", "kid_inception_std"}
    assert all(torch.isfinite(torch.tensor(v)) for v in scores.values())


# ---- during training --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_critic", [2, 1])  # 1: the first batch already ends at generator step 1
def test_callback_logs_on_generator_steps_and_keeps_the_best_checkpoint(tmp_path, n_critic):
    from wgan_lit.callbacks import GeneratorStepLimit

    real = random_uint8(100, seed=1)
    built = []

    def make_scorer(device):
        built.append(device)
        return SampleQuality(real, tiny_classifier(), kid_subsets=3, kid_subset_size=20)

    quality = SampleQualityCallback(make_scorer, every_n_gen_steps=2, n_samples=30, seed=0)
    best = best_checkpoint(tmp_path / "ckpt", "fd_classifier")
    logger = CSVLogger(tmp_path, name="csv", version="")
    model = WGAN(n_critic=n_critic, log_every_n_gen_steps=100, **TINY)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=20,
        logger=logger,
        callbacks=[GeneratorStepLimit(5), quality, best],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(model, datamodule=RandomImages(n=400, batch_size=8))
    assert len(built) == 1  # real statistics once per run
    logger.save()
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [
        int(r.split(",")[header.index("step")])
        for r in rows[1:]
        if r.split(",")[header.index("metrics/coverage")]
    ]
    assert steps == [0, 2, 4, 5]  # the untrained model, every 2 generator steps, and the final model
    assert {"metrics/fd_classifier", "metrics/kid", "metrics/coverage"} <= set(trainer.callback_metrics)
    saved = list((tmp_path / "ckpt").glob("best-*.ckpt"))
    assert len(saved) == 1
    fds = [
        float(r.split(",")[header.index("metrics/fd_classifier")])
        for r in rows[1:]
        if r.split(",")[header.index("metrics/fd_classifier")]
    ]
    assert float(best.best_model_score) == pytest.approx(min(fds))


def test_callback_samples_do_not_change_training(tmp_path):
    def fit(with_metrics: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = WGAN(n_critic=2, **TINY)
        callbacks = (
            [
                SampleQualityCallback(
                    lambda d: SampleQuality(
                        random_uint8(60), tiny_classifier(), kid_subsets=2, kid_subset_size=10
                    ),
                    1,
                    n_samples=20,
                )
            ]
            if with_metrics
            else []
        )
        torch.manual_seed(1)
        tiny_trainer(6, callbacks=callbacks).fit(model, datamodule=RandomImages(n=64, batch_size=8))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(fit(True), fit(False))


def test_train_with_metrics_on_logs_them_and_writes_a_best_checkpoint(tmp_path, monkeypatch, capfd):
    from hydra import compose, initialize_config_dir
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from wgan_lit.cli import CONF_DIR
    from wgan_lit.config import validate
    from wgan_lit.train import train

    data = write_fake_fashion_mnist(tmp_path / "data", n_train=128, n_test=64)
    weights = clf.save(tiny_classifier(), tmp_path / "c.pt", test_accuracy=1.0)  # plumbing only: no real data
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights here
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(
            "train",
            overrides=[
                "trainer=cpu",
                "trainer.enable_progress_bar=false",
                "model.g_features=8",
                "model.d_features=8",
                "model.latent_dim=16",
                "model.n_critic=2",
                "data.batch_size=16",
                f"data.root={data}",
                "max_gen_steps=4",
                "logger.sample_every_n_gen_steps=0",
                "metrics=enabled",
                "metrics.every_n_gen_steps=3",
                "metrics.n_samples=40",
                "metrics.kid_subsets=5",
                f"metrics.classifier_path={weights}",
            ],
        )
    final = train(validate(cfg), tmp_path / "run")
    assert "Inception FID/KID skipped" in capfd.readouterr().err
    assert {"metrics/fd_classifier", "metrics/kid", "metrics/coverage"} <= set(final)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("metrics/fd_classifier")] == [0, 3, 4]
    assert len(list((tmp_path / "run" / "checkpoints").glob("best-gen*-fd_classifier*.ckpt"))) == 1


def test_metrics_config_values_are_checked():
    from wgan_lit.config import MetricsConfig, TrainConfig, _rules

    bad = TrainConfig(
        metrics=MetricsConfig(
            every_n_gen_steps=-1, n_samples=100, kid_subset_size=1, checkpoint_monitor="fid"
        )
    )
    failed = {key for key, _, ok, _ in _rules(bad) if not ok}
    assert failed == {"metrics.every_n_gen_steps", "metrics.kid_subset_size", "metrics.checkpoint_monitor"}
    assert not [key for key, _, ok, _ in _rules(TrainConfig()) if not ok]




@pytest.mark.slow
def test_under_ddp_rank_0_scores_and_every_rank_logs_the_same(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "metrics_ddp_probe.py"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted(
        (json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line),
        key=lambda r: r["rank"],
    )
    assert [(r["rank"], r["built"]) for r in results] == [(0, True), (1, False)]  # real statistics once
    assert results[0]["metrics"] == results[1]["metrics"] and "metrics/fd_classifier" in results[0]["metrics"]
    assert len(list((tmp_path / "ckpt").glob("best-gen*.ckpt"))) == 1


def metrics_run(tmp_path: Path, monkeypatch, max_gen_steps: int, ckpt_path: str = "", **trainer):
    """A tiny in-process run with the metrics every 2 generator steps; the steps at which it scored."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import tiny_config
    from wgan_lit.train import train

    data = write_fake_fashion_mnist(tmp_path / "data", n_train=128, n_test=64)
    weights = clf.save(tiny_classifier(), tmp_path / "c.pt", test_accuracy=1.0)  # plumbing only: no real data
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights here
    cfg = tiny_config(data, max_gen_steps, ckpt_path=ckpt_path)
    cfg.trainer.update(trainer)
    cfg.metrics.every_n_gen_steps, cfg.metrics.n_samples, cfg.metrics.kid_subsets = 2, 20, 2
    cfg.metrics.classifier_path = str(weights)
    train(cfg, tmp_path / "run")
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("metrics/fd_classifier")], load_last(tmp_path / "run")


def load_last(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["wgan_counters"]["gen_step"]


def test_a_max_time_stop_still_scores_the_final_model(tmp_path, monkeypatch):
    steps, final = metrics_run(tmp_path, monkeypatch, -1, max_epochs=-1, max_time="00:00:00:03")
    assert final > 0 and steps[0] == 0 and steps[-1] == final  # the model the run ended with
    assert steps[:-1] == list(range(0, final, 2)) or steps == list(range(0, final + 1, 2))


def test_a_resumed_run_does_not_score_the_step_it_resumes_from_again(tmp_path, monkeypatch):
    first, final = metrics_run(tmp_path, monkeypatch, 4)
    assert first == [0, 2, 4] and final == 4
    both, final = metrics_run(tmp_path, monkeypatch, 8, ckpt_path=str(tmp_path / "run/checkpoints/last.ckpt"))
    assert both == [0, 2, 4, 6, 8]  # both runs' event files: step 4 once


def test_training_scores_against_training_images_and_evaluate_against_the_test_set(tmp_path):
    from wgan_lit.config import DataConfig
    from wgan_lit.metrics import reference_images

    data = DataConfig(root=str(write_fake_fashion_mnist(tmp_path / "d", n_train=128, n_test=64)))
    train_ref, test_ref = reference_images(data, 28), reference_images(data, 28, split="test")
    assert len(train_ref) == 128 and len(test_ref) == 64
    assert torch.equal(test_ref, load_fashion_mnist(*locate_fashion_mnist(data.root, "test"))[0])


def test_inception_weights_are_fetched_once_on_request_and_checked(tmp_path, monkeypatch):
    import hashlib

    from wgan_lit.metrics import INCEPTION_WEIGHTS_FILE, find_inception_weights

    pytest.importorskip("torch_fidelity")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    payload = b"weights of a test" * 1000
    digest = hashlib.sha256(payload).hexdigest()
    good = tmp_path / "served" / f"weights-test-{digest[:8]}.pth"
    good.parent.mkdir()
    good.write_bytes(payload)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_WEIGHTS_FILE

    path, why = find_inception_weights()  # control: without the opt-in nothing is fetched
    assert path is None and "metrics.inception_download=true" in why and not cached.exists()

    bad = good.with_name(f"weights-test-{'0' * 8}.pth")  # the file name promises another checksum
    bad.write_bytes(payload)
    with pytest.raises(clf.ClassifierError, match="download failed.*nothing was written"):
        find_inception_weights(download_from=bad.as_uri())
    assert not cached.exists()

    assert find_inception_weights(download_from=good.as_uri()) == (cached, "")
    assert cached.read_bytes() == payload
    good.unlink()  # once: a second call uses the cache and fetches nothing
    assert find_inception_weights(download_from=good.as_uri()) == (cached, "")




# ---- the metrics leave the training's randomness alone ------------------------------------------------------


def test_kid_draws_the_subsets_torch_manual_seed_would_from_a_private_generator():
    from wgan_lit.metrics import kid_compute

    scorer = SampleQuality(random_uint8(64), tiny_classifier(), kid_subsets=4, kid_subset_size=16)
    scorer.score(random_uint8(40, seed=1))
    kid = scorer.pairs["classifier"][1]
    torch.manual_seed(5)
    expected = kid.compute()  # torchmetrics' own draws from the seeded global RNG
    assert [float(v) for v in kid_compute(kid, 5)] == [float(v) for v in expected]
    assert float(kid_compute(kid, 6)[0]) != float(expected[0])  # control: the seed picks the subsets


def test_an_evaluation_and_a_classifier_build_never_seed_the_global_rng(monkeypatch):
    scorer = SampleQuality(random_uint8(64), tiny_classifier(), kid_subsets=3, kid_subset_size=16)
    model = WGAN(ema_decay=0.9, **TINY)
    callback = SampleQualityCallback(None, every_n_gen_steps=1, n_samples=20, batch_size=8)
    callback.scorer = scorer
    seeded = []
    for owner, name in [(torch, "manual_seed"), (torch.random, "manual_seed"), (torch.cuda, "manual_seed"),
                        (torch.cuda, "manual_seed_all"), (torch.cuda.random, "manual_seed_all")]:
        monkeypatch.setattr(owner, name, lambda *a, _n=name, **k: seeded.append(_n))
    cpu_before = torch.random.get_rng_state()
    cuda_before = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    scores = callback.evaluate(model)
    clf.train_classifier(random_uint8(64), torch.arange(64) % 10, epochs=1, batch_size=32, width=4,
                         num_features=8)
    assert {"metrics/kid", "metrics_raw/kid"} <= set(scores)
    assert seeded == []
    assert torch.equal(torch.random.get_rng_state(), cpu_before)
    for a, b in zip(cuda_before, torch.cuda.get_rng_state_all() if cuda_before else [], strict=True):
        assert torch.equal(a, b)


def test_a_deterministic_run_ends_with_the_same_weights_with_metrics_on_as_off(tmp_path, monkeypatch):
    from tests.conftest import assert_same_training_state, load, tiny_config
    from wgan_lit.train import train

    data = write_fake_fashion_mnist(tmp_path / "data", n_train=128, n_test=64)
    weights = clf.save(tiny_classifier(), tmp_path / "c.pt", test_accuracy=1.0)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights here

    def run(name: str, metrics: bool) -> dict:
        cfg = tiny_config(data, 6, ema_decay=0.9)
        cfg.logger.sample_every_n_gen_steps = 0
        if metrics:
            cfg.metrics.every_n_gen_steps, cfg.metrics.n_samples, cfg.metrics.kid_subsets = 2, 20, 2
            cfg.metrics.classifier_path, cfg.metrics.checkpoint_monitor = str(weights), ""
        train(cfg, tmp_path / name)
        return load(tmp_path / name / "checkpoints" / "last.ckpt")

    off = run("off", metrics=False)
    assert_same_training_state(run("on", metrics=True), off)
    # Control: an evaluation that drew from the training's RNG would change the run.
    score = SampleQuality.score
    monkeypatch.setattr(SampleQuality, "score", lambda self, fake: (torch.rand(1), score(self, fake))[1])
    with pytest.raises(AssertionError):
        assert_same_training_state(run("leaky", metrics=True), off)
