"""metrics.py: the metrics measure what they claim, are deterministic, never draw from the run's random streams,
and score during training (schedule, best checkpoint, max_time, resume, DDP); Inception weights only from disk."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torchmetrics.image.kid import KernelInceptionDistance

from tests.conftest import ENV, REPO, TINY, RandomImages, assert_same_training_state, load, tiny_classifier, tiny_config
from wgan_lit import classifier as clf
from wgan_lit import metrics
from wgan_lit.callbacks import GeneratorStepLimit
from wgan_lit.config import DataConfig, MetricsConfig
from wgan_lit.data import build_datamodule
from wgan_lit.fashion_mnist import SYSTEM_DIRS, load_fashion_mnist, locate_fashion_mnist
from wgan_lit.metrics import METRICS, Metric, SampleQuality, SampleQualityCallback, find_inception_weights
from wgan_lit.module import WGAN
from wgan_lit.train import train


def u8(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def scalar_steps(run, tag: str = "metrics/fd_classifier") -> list[int]:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()  # every event file of the directory: a resumed run's too
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.real_data
@pytest.mark.skipif(not SYSTEM_DIRS[0].is_dir(), reason="no real Fashion-MNIST: apt-get install dataset-fashion-mnist")
def test_on_real_data_the_metrics_measure_what_they_claim():
    (train_x, train_y), (test_x, test_y) = (load_fashion_mnist(*locate_fashion_mnist(SYSTEM_DIRS[0], s))
                                            for s in ("train", "test"))
    # Seconds of training on part of the set (the shipped classifier: all of it, 4 epochs, 4x wider).
    model = clf.train_classifier(train_x[:24000], train_y[:24000], epochs=1, width=8, num_features=32)
    assert clf.accuracy(model, test_x, test_y) > 0.8
    q = SampleQuality(train_x[-10000:], model, kid_subsets=20, kid_subset_size=500)  # training statistics
    real, fractions = q.score(test_x), q.class_fractions  # the test set: an unseen sample of the same law
    assert real["coverage"] > 0.97 and all(0.07 < f < 0.13 for f in fractions.values()), fractions  # 1000 a class
    noise = q.score(u8(2000))
    assert real["fd_classifier"] < 0.02 * noise["fd_classifier"] and abs(real["kid"]) < 0.01 * noise["kid"]
    assert noise["coverage"] < 0.5  # noise is not spread over the classes like clothing is
    one = q.score(test_x[:1].expand(2000, -1, -1, -1))
    assert one["coverage"] < 0.05 and max(q.class_fractions.values()) == 1.0
    assert one["fd_classifier"] > 10 * q.score(test_x[:2000])["fd_classifier"]
    assert 0.6 < q.score(test_x[test_y < 5])["coverage"] < 0.8  # log 5 / log 10 = 0.70 for five equal classes
    assert q.score(test_x[:1000].float() / 127.5 - 1) == q.score(test_x[:1000])  # floats in [-1, 1] as their uint8


def test_scores_are_deterministic_follow_the_seed_and_the_real_images_and_draw_no_global_random_number():
    real, fake, model = u8(300, seed=1), u8(200, seed=2), tiny_classifier()
    a, b, other = (SampleQuality(real, m, kid_subsets=10, kid_subset_size=50, seed=s)
                   for m, s in ((model, 3), (tiny_classifier(), 3), (tiny_classifier(), 4)))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = a.score(fake)
    assert torch.equal(torch.get_rng_state(), state)  # KID's subsets come from a private generator
    assert a.score(fake) == first == b.score(fake) and set(first) == {"fd_classifier", "kid", "kid_std", "coverage"}
    assert other.score(fake)["kid"] != first["kid"] and other.score(fake)["fd_classifier"] == first["fd_classifier"]
    assert a.score(fake // 8)["fd_classifier"] > 10 * first["fd_classifier"]  # darker than the real images
    model.train()  # e.g. a parent module switching to training mode: the features stay inference-mode ones
    assert a.score(fake) == first


def test_kid_draws_the_subsets_torch_manual_seed_would_from_a_private_generator_and_coverage_s_entropy():
    real, fake = torch.randn(64, 8), torch.randn(40, 8) + 0.3
    kid = KernelInceptionDistance(feature=nn.Identity(), subsets=4, subset_size=16)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(5)
    expected = kid.compute()  # torchmetrics' own draws from the seeded global RNG
    assert [float(v) for v in metrics.kid_compute(real, fake, 4, 16, 5)] == [float(v) for v in expected]
    assert float(metrics.kid_compute(real, fake, 4, 16, 6)[0]) != float(expected[0])  # control: the seed decides
    assert metrics.normalized_entropy(torch.tensor([5, 5, 5, 5])) == pytest.approx(1.0)  # coverage's entropy
    assert str(metrics.normalized_entropy(torch.tensor([0, 7, 0, 0]))) == "0.0"
    assert metrics.normalized_entropy(torch.tensor([1, 1, 0, 0])) == pytest.approx(0.5)


def test_inception_weights_come_from_disk_or_one_checked_download_asked_for(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / metrics.INCEPTION_WEIGHTS_FILE
    path, why = find_inception_weights()  # without the opt-in nothing is fetched
    assert path is None and "torch hub cache" in why and "metrics.inception_download=true" in why
    assert find_inception_weights(tmp_path / "no.pth") == (None, f"metrics.inception_weights={tmp_path}/no.pth does "
                                                           "not exist")
    assert not (tmp_path / "torch").exists()
    payload = b"weights of a test" * 1000
    good = tmp_path / "served" / f"weights-test-{hashlib.sha256(payload).hexdigest()[:8]}.pth"
    good.parent.mkdir()
    for name in (good.name, "weights.pth", "weights-test-00000000.pth"):  # the last promises another checksum
        good.with_name(name).write_bytes(payload)
    for name, error in [("weights.pth", "no sha256 prefix"), ("weights-test-00000000.pth", "download failed.*nothing")]:
        with pytest.raises(clf.ClassifierError, match=error):
            find_inception_weights(download_from=good.with_name(name).as_uri())
        assert not cached.exists()
    assert find_inception_weights(download_from=good.as_uri()) == (cached, "") and cached.read_bytes() == payload
    good.unlink()  # once: a second call uses the cache and fetches nothing
    assert find_inception_weights(download_from=good.as_uri()) == (cached, "")


def test_inception_metrics_when_weights_are_on_disk(tmp_path, monkeypatch):
    """A randomly initialised Inception-v3 in torch-fidelity's weight format: the real loading code runs."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    path = tmp_path / "weights.pth"
    torch.save({}, path)
    monkeypatch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    torch.save(fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(path)).state_dict(), path)
    monkeypatch.undo()
    assert find_inception_weights(str(path)) == (path, "")
    # The 64-d layer: the same loading and plumbing as the standard 2048-d one, at a fraction of the CPU time.
    scores = SampleQuality(u8(4, seed=1), None, path, kid_subsets=2, kid_subset_size=3, inception_dims=64).score(u8(4))
    assert set(scores) == {"fid_inception", "kid_inception", "kid_inception_std"}
    assert all(torch.isfinite(torch.tensor(v)) for v in scores.values())


def test_the_callback_scores_its_schedule_builds_once_and_keeps_the_best_by_a_metric_a_test_adds(tmp_path, monkeypatch):
    mean = lambda images: float(images.float().mean())  # a new metric, added by one METRICS entry
    monkeypatch.setitem(METRICS, "brightness", Metric("min", lambda q: SimpleNamespace(
        names=("brightness",), score=lambda fake: {"brightness": abs(mean(fake) - mean(q.real))})))
    built = []
    quality = SampleQualityCallback(lambda device: built.append(device) or SampleQuality(
        u8(100, seed=1), tiny_classifier(), kid_subsets=3, kid_subset_size=20), every_n_gen_steps=2, n_samples=30)
    best = metrics.best_checkpoint(tmp_path / "ckpt", "brightness")
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=20, log_every_n_steps=1,
                        logger=CSVLogger(tmp_path, name="csv", version=""), enable_progress_bar=False,
                        callbacks=[GeneratorStepLimit(5), quality, best], enable_model_summary=False)
    trainer.fit(WGAN(n_critic=1, log_every_n_gen_steps=100, **TINY), datamodule=RandomImages(n=400, batch_size=8))
    trainer.logger.save()
    rows = [r for r in csv.DictReader((tmp_path / "csv" / "metrics.csv").open()) if r["metrics/coverage"]]
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 5]  # 0 before batch 1 (which ends at step 1), every 2, the end
    assert len(built) == 1  # real statistics once per run
    assert {"metrics/fd_classifier", "metrics/kid", "metrics/coverage", "metrics/brightness"} <= set(
        trainer.callback_metrics)
    assert len(list((tmp_path / "ckpt").glob("best-gen*-brightness*.ckpt"))) == 1
    assert float(best.best_model_score) == pytest.approx(min(float(r["metrics/brightness"]) for r in rows))


@pytest.fixture
def scored(fake_fmnist, tmp_path, monkeypatch):
    """(fake Fashion-MNIST, a tiny classifier file): what an in-process run with metrics needs, no Inception."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return fake_fmnist, clf.save(tiny_classifier(), tmp_path / "c.pt", test_accuracy=1.0)  # plumbing: no real data


def train_scored(scored, run_dir, max_gen_steps, every=2, ckpt_path="", trainer=(), **model) -> dict:
    """last.ckpt (and "final": what train() returned) of an in-process run scored every ``every`` generator steps."""
    cfg = tiny_config(scored[0], max_gen_steps, ckpt_path, dict(log_every_n_gen_steps=99, sample_every_n_gen_steps=0),
                      **model)
    cfg.trainer.update(trainer)
    cfg.metrics.every_n_gen_steps, cfg.metrics.n_samples, cfg.metrics.kid_subsets = every, 20, 2
    cfg.metrics.classifier_path = str(scored[1])
    final = train(cfg, run_dir)
    return {**load(run_dir / "checkpoints" / "last.ckpt"), "final": final}


def test_training_scores_against_its_training_images_evaluate_against_the_test_set(scored, tmp_path):
    (data, weights), dc = scored, DataConfig(root=str(scored[0]))
    mc = MetricsConfig(every_n_gen_steps=2, kid_subsets=2, classifier_path=str(weights))
    in_training = metrics.sample_quality_callbacks(mc, dc, tmp_path, build_datamodule(dc))[0].make_scorer("cpu")
    assert torch.equal(in_training.real, load_fashion_mnist(*locate_fashion_mnist(data, "train"))[0])
    in_evaluate = metrics.build_sample_quality(mc, dc, build_datamodule(dc))[0]
    assert torch.equal(in_evaluate.real, load_fashion_mnist(*locate_fashion_mnist(data, "test"))[0])


def test_training_with_metrics_logs_them_keeps_the_best_and_ends_with_the_same_weights(scored, tmp_path, capfd,
                                                                                        monkeypatch):
    on, off = (train_scored(scored, tmp_path / run, 5, every, ema_decay=0.9) for run, every in [("on", 2), ("off", 0)])
    assert "Inception FID/KID skipped" in capfd.readouterr().err
    assert {"metrics/fd_classifier", "metrics/kid", "metrics/coverage", "metrics_raw/coverage"} <= set(on["final"])
    assert scalar_steps(tmp_path / "on") == [0, 2, 4, 5]
    assert len(list((tmp_path / "on" / "checkpoints").glob("best-gen*-fd_classifier*.ckpt"))) == 1
    assert_same_training_state(on, off)
    # Control: an evaluation that drew from the training's RNG would change the run.
    score = SampleQuality.score
    monkeypatch.setattr(SampleQuality, "score", lambda self, fake: (torch.rand(1), score(self, fake))[1])
    with pytest.raises(AssertionError):
        assert_same_training_state(train_scored(scored, tmp_path / "leaky", 5, ema_decay=0.9), off)


def test_a_max_time_stop_scores_the_final_model_and_its_resume_does_not_score_it_again(scored, tmp_path):
    run, last = tmp_path / "run", str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    timed = {"max_epochs": -1, "max_time": "00:00:00:03"}
    final = train_scored(scored, run, -1, trainer=timed)["wgan_counters"]["gen_step"]
    assert final > 0 and scalar_steps(run) == sorted({*range(0, final, 2), final})
    assert train_scored(scored, run, final + 3, ckpt_path=last, trainer={"max_epochs": -1})["wgan_counters"][
        "gen_step"] == final + 3
    assert scalar_steps(run) == sorted({*range(0, final + 3, 2), final, final + 3})  # both runs' files: `final` once


def test_an_evaluation_and_a_classifier_build_never_seed_the_global_rng(monkeypatch):
    callback = SampleQualityCallback(None, every_n_gen_steps=1, n_samples=20, batch_size=8)
    callback.scorer = SampleQuality(u8(64), tiny_classifier(), kid_subsets=3, kid_subset_size=16)
    model, seeded = WGAN(ema_decay=0.9, **TINY), []
    for owner, name in [(torch, "manual_seed"), (torch.random, "manual_seed"), (torch.cuda, "manual_seed"),
                        (torch.cuda, "manual_seed_all"), (torch.cuda.random, "manual_seed_all")]:
        monkeypatch.setattr(owner, name, lambda *a, _n=name, **k: seeded.append(_n))
    cpu_before = torch.random.get_rng_state()
    cuda_before = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    scores = callback.evaluate(model)
    clf.train_classifier(u8(64), torch.arange(64) % 10, epochs=1, batch_size=32, width=4, num_features=8)
    assert {"metrics/kid", "metrics_raw/kid"} <= set(scores) and seeded == []
    assert torch.equal(torch.random.get_rng_state(), cpu_before)
    for a, b in zip(cuda_before, torch.cuda.get_rng_state_all() if cuda_before else [], strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_under_ddp_rank_0_scores_and_every_rank_logs_the_same(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "metrics_ddp_probe.py"), str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines()
                      if "RESULT " in line), key=lambda r: r["rank"])
    assert [(r["rank"], r["built"]) for r in results] == [(0, True), (1, False)]  # real statistics once
    assert results[0]["metrics"] == results[1]["metrics"] and "metrics/fd_classifier" in results[0]["metrics"]
    assert len(list((tmp_path / "ckpt").glob("best-gen*.ckpt"))) == 1
