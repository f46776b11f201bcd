"""Sample-quality metrics that need no download, of fixed-noise samples in training and in ``wgan_lit.evaluate``:
``fd_classifier``, ``kid`` and ``coverage`` on the project's Fashion-MNIST classifier, ``fid_inception`` and
``kid_inception`` where Inception-v3's weights are on disk. docs/metrics.md says how to read them."""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.image.kid import poly_mmd
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from wgan_lit import classifier as clf
from wgan_lit.config import DataConfig, MetricsConfig
from wgan_lit.data import resize_uint8, to_unit_range

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads
INCEPTION = ("fid_inception", "kid_inception")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255], as a saved image: real and fake are scored through the same quantization."""
    return images.add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def notice(message: str) -> None:
    """One line on stderr, for what is skipped and why (the run goes on)."""
    print(f"[wgan_lit.metrics] {message}", file=sys.stderr, flush=True)


def normalized_entropy(counts: torch.Tensor) -> float:
    """Entropy of a histogram divided by log(number of bins): 1 = uniform, 0 = one bin."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float((p * p.reciprocal().log()).sum() / math.log(len(counts)))  # p log(1/p): never -0.0


def kid_compute(real: torch.Tensor, fake: torch.Tensor, subsets: int, size: int, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """torchmetrics' KID (mean, std) after torch.manual_seed(seed), which would also reseed CUDA's (the run's) RNG."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.stack([poly_mmd(real[torch.randperm(len(real), generator=gen)[:size]],
                                   fake[torch.randperm(len(fake), generator=gen)[:size]]) for _ in range(subsets)])
    return scores.mean(), scores.std(unbiased=False)


def find_inception_weights(configured: str | Path | None = None, download_from: str = ""
                           ) -> tuple[Path | None, str]:
    """(path, "") of the Inception weights on disk, or (None, why not); fetched, checked, only from download_from."""
    if not _TORCH_FIDELITY_AVAILABLE:
        return None, "torch-fidelity is not installed (pip install 'wgan_lit[inception]')"
    if configured:
        path = Path(configured).expanduser()
        return (path, "") if path.is_file() else (None, f"metrics.inception_weights={configured} does not exist")
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not path.is_file() and download_from:
        url = f"metrics.inception_url={download_from}"
        if (match := re.search(r"-([a-f0-9]{8,})\.", Path(download_from.split("?")[0]).name)) is None:
            raise clf.ClassifierError(f"{url}: its file name carries no sha256 prefix (name-<hex>.pth), so the "
                                      "download could not be checked")
        path.parent.mkdir(parents=True, exist_ok=True)
        notice(f"downloading the Inception weights once: {download_from} -> {path}")
        try:  # torch hub writes nothing to path when the hash differs (a RuntimeError); network: URLError
            torch.hub.download_url_to_file(download_from, str(path), hash_prefix=match.group(1), progress=True)
        except (RuntimeError, OSError, ValueError) as err:
            raise clf.ClassifierError(f"{url}: the download failed ({type(err).__name__}: "
                                      f"{str(err).splitlines()[0]}); nothing was written to {path}") from err
    if path.is_file():
        return path, ""
    return None, (f"no {INCEPTION_WEIGHTS_FILE} in the torch hub cache ({path.parent}); put it there, set "
                  "metrics.inception_weights=PATH, or fetch it once with metrics.inception_download=true")


class Distances:
    """A part of SampleQuality: Frechet distance, KID (and with ``head``, coverage) on ``extract``'s features."""

    def __init__(self, q: SampleQuality, names: tuple[str, ...], extract: Callable[[torch.Tensor], torch.Tensor],
                 num_features: int, head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        features = nn.Identity()  # torchmetrics is given the features: each batch is extracted once, for both
        features.num_features = num_features
        self.q, self.names, self.extract, self.head = q, names, extract, head
        self.fid = FrechetInceptionDistance(features, reset_real_features=False, sync_on_compute=False).to(q.device)
        self.real = torch.cat(self.features(q.real, real=True))

    def features(self, images: torch.Tensor, real: bool = False) -> list[torch.Tensor]:
        out = [self.extract(images[i : i + self.q.batch_size].to(self.q.device))
               for i in range(0, len(images), self.q.batch_size)]
        for f in out:
            self.fid.update(f, real=real)
        return out

    def score(self, fake: torch.Tensor) -> dict[str, float]:
        self.fid.reset()  # forgets the previous fakes, keeps the real statistics
        batches = self.features(fake)
        kid, std = kid_compute(self.real, torch.cat(batches), self.q.kid_subsets,
                               min(self.q.kid_subset_size, len(self.real), len(fake)), self.q.seed)
        out = dict(zip(self.names, (float(self.fid.compute()), float(kid), float(std)), strict=False))
        if self.head is not None:
            counts = sum(torch.bincount(self.head(f).argmax(1).cpu(), minlength=len(clf.CLASSES)) for f in batches)
            self.class_fractions = dict(zip(clf.CLASSES, (counts.double() / counts.sum()).tolist(), strict=True))
            out[self.names[3]] = normalized_entropy(counts)
        return out


def _classifier(q: SampleQuality) -> Distances | None:
    if q.classifier is None:
        return None
    net = q.classifier.to(q.device)  # put in inference mode at every batch, whatever switched it
    return Distances(q, ("fd_classifier", "kid", "kid_std", "coverage"),
                     lambda x: net.eval().features(to_unit_range(x)), net.num_features, net.head)


def _inception(q: SampleQuality) -> Distances | None:
    if q.inception_weights is None:
        return None
    # An explicit path: torch-fidelity would download the weights if it were None.
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(q.inception_dims)],
                             feature_extractor_weights_path=str(q.inception_weights)).to(q.device)
    return Distances(q, (*INCEPTION, "kid_inception_std"), lambda x: net(x.expand(-1, 3, -1, -1)), q.inception_dims)


class Metric(NamedTuple):
    better: str  # "min" or "max"
    build: Callable[[SampleQuality], Any]  # -> the part that scores it (with the names sharing build), or None


# METRICS: name -> Metric(better, build(SampleQuality) -> part | None), a part having ``names`` and ``score(uint8
# fakes) -> {name: float}``; a test adds a metric with one entry. config checks metrics.checkpoint_monitor by its keys.
METRICS: dict[str, Metric] = {"fd_classifier": Metric("min", _classifier), "kid": Metric("min", _classifier),
                              "coverage": Metric("max", _classifier), "fid_inception": Metric("min", _inception),
                              "kid_inception": Metric("min", _inception)}


@dataclass(eq=False)
class SampleQuality:
    """Scores generated images against ``real`` (uint8 N x C x H x W) with every METRICS entry that applies."""

    real: torch.Tensor
    classifier: clf.FashionClassifier | None = None
    inception_weights: str | Path | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    batch_size: int = 500
    device: str | torch.device = "cpu"
    inception_dims: int = 2048

    def __post_init__(self) -> None:
        if self.real.dtype != torch.uint8 or self.real.ndim != 4:
            raise ValueError(f"real images must be uint8 (N, C, H, W), got {self.real.dtype} {tuple(self.real.shape)}")
        self.n_real, self.device, self.class_fractions = len(self.real), torch.device(self.device), {}
        with torch.no_grad():
            self.parts = [p for build in dict.fromkeys(m.build for m in METRICS.values()) if (p := build(self))]

    @torch.no_grad()
    def score(self, fake: torch.Tensor) -> dict[str, float]:
        """Metrics of generated images: uint8 [0, 255] or float [-1, 1], shape (N, C, H, W), N >= 2."""
        if len(fake) < 2:
            raise ValueError(f"need at least 2 generated images, got {len(fake)}")
        fake = to_uint8(fake) if fake.is_floating_point() else fake
        out = {k: v for part in self.parts for k, v in part.score(fake).items()}
        self.class_fractions = next((p.class_fractions for p in self.parts if hasattr(p, "class_fractions")), {})
        return out

    def sample_scores(self, model: Any, n_samples: int, seed: int, batch_size: int = 500, size: int = 0
                      ) -> dict[str, dict[str, float]]:
        """{"metrics": scores, "metrics_raw": the raw generator's beside an average} of the latents of ``seed``."""
        z, out = model.latents(n_samples, seed), {}
        for key, ema in [("metrics_raw", False)] * (model.generator_ema is not None) + [("metrics", True)]:
            fake = torch.cat([to_uint8(x) for x in model.sample(z, batch_size, ema=ema)])
            out[key] = self.score(resize_uint8(fake, size) if size else fake)
        return out


class SampleQualityCallback(L.Callback):
    """Scores ``n_samples`` images of fixed noise (``seed``) every ``every_n_gen_steps`` generator steps and/or
    ``every_n_seconds`` of training, before the first batch and for the final model. Rank 0 scores and broadcasts:
    every rank logs the same ``metrics/<name>`` (``metrics_raw/<name>``: the raw generator beside an averaged one)."""

    def __init__(self, make_scorer: Callable[[torch.device], SampleQuality | None] | None, every_n_gen_steps: int,
                 n_samples: int = 5000, seed: int = 0, batch_size: int = 500, every_n_seconds: float = 0.0) -> None:
        self.make_scorer, self.every, self.seconds = make_scorer, every_n_gen_steps, every_n_seconds
        self.n_samples, self.seed, self.batch_size = n_samples, seed, batch_size
        self.scorer: SampleQuality | None = None
        self._last_step, self._last_time = -1, time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:  # the step a checkpoint holds was scored before it was written (same batch end)
            self._last_step = pl_module.gen_step
        if trainer.is_global_zero and self.scorer is None and self.make_scorer is not None:
            with torch.random.fork_rng(devices=[]):  # building (or training) the classifier draws: not the run's
                self.scorer = self.make_scorer(pl_module.device)
            self.make_scorer = None  # built once, even when it came back None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if pl_module.gen_step == 0 and self._last_step < 0:  # the untrained generator (n_critic=1 ends no batch at 0)
            self._score(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step, last_epoch = pl_module.gen_step, trainer.current_epoch + 1 >= (trainer.max_epochs or 0) >= 1
        if step == self._last_step:
            return
        # On time, rank 0's clock decides, every 10th generator step, so that every rank takes part in the broadcast.
        if ((self.every > 0 and step % self.every == 0) or trainer.should_stop or (trainer.is_last_batch and last_epoch)
                or (self.seconds > 0 and step % 10 == 0 and trainer.strategy.broadcast(
                    time.monotonic() - self._last_time >= self.seconds, src=0))):
            self._score(trainer, pl_module)

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = pl_module.gen_step
        scores = trainer.strategy.broadcast(self.evaluate(pl_module) if trainer.is_global_zero else None, src=0)
        self._last_time = time.monotonic()  # the interval is training time, not the evaluation's
        for logger in trainer.loggers if scores else []:  # no scores: the notice at the start said why
            logger.log_metrics(scores, step=self._last_step)
        for name, value in (scores or {}).items():  # for ModelCheckpoint and train()'s result
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False)

    def evaluate(self, module: L.LightningModule) -> dict[str, float]:
        """``metrics/<name>`` (and ``metrics_raw/<name>``) of the fixed noise's images; none of the run's draws."""
        scores = self.scorer.sample_scores(module, self.n_samples, self.seed, self.batch_size) if self.scorer else {}
        return {f"{key}/{name}": v for key, s in scores.items() for name, v in s.items()}


def build_sample_quality(mc: MetricsConfig, data: DataConfig, datamodule: Any, device: str | torch.device = "cpu",
                         split: str | None = None) -> tuple[SampleQuality | None, dict[str, str]]:
    """(a SampleQuality against ``datamodule.reference_images(split)``, or None; {skipped metric: why}), noticed."""
    classifier = clf.load_or_build(mc.classifier_path or None, data.root, device) if datamodule.has_classifier else None
    if classifier is None:
        notice(f"fd_classifier, kid and coverage skipped: the classifier knows Fashion-MNIST, not {data.name}")
    weights, why = (find_inception_weights(mc.inception_weights, mc.inception_url if mc.inception_download else "")
                    if mc.inception else (None, "metrics.inception=false"))
    if why and mc.inception:
        notice(f"Inception FID/KID skipped: {why}. Continuing without them.")
    scorer = SampleQuality(datamodule.reference_images(split), classifier, weights, mc.kid_subsets, mc.kid_subset_size,
                           mc.seed, device=device)
    if not scorer.parts:
        notice("no sample-quality metric can be computed for this run; metrics/* will not be logged.")
    return scorer if scorer.parts else None, dict.fromkeys(INCEPTION, why) if why else {}


def sample_quality_callbacks(mc: MetricsConfig, data: DataConfig, checkpoint_dir: str | Path, datamodule: Any
                             ) -> list[L.Callback]:
    """The scorer (on training images: the test set stays unseen) and the best checkpoint, when metrics are on."""
    if mc.every_n_gen_steps <= 0 and mc.every_n_seconds <= 0:
        return []
    make_scorer = lambda device: build_sample_quality(mc, data, datamodule, device, split="train")[0]
    return [SampleQualityCallback(make_scorer, mc.every_n_gen_steps, mc.n_samples, mc.seed,
                                  every_n_seconds=mc.every_n_seconds),
            *([best_checkpoint(checkpoint_dir, mc.checkpoint_monitor)] if mc.checkpoint_monitor else [])]


def best_checkpoint(dirpath: str | Path, metric: str) -> ModelCheckpoint:
    """Keeps ``best-gen<N>-<metric><value>.ckpt``: the generator step that scored best on ``metric``."""
    # Lightning warns that it holds the state after the optimizer step: the state that was scored.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n")
    return ModelCheckpoint(dirpath=dirpath, filename=f"best-gen{{gen_step:.0f}}-{metric}{{metrics/{metric}:.4f}}",
                           auto_insert_metric_name=False, monitor=f"metrics/{metric}", mode=METRICS[metric].better,
                           save_top_k=1, every_n_train_steps=1, save_last=False)
