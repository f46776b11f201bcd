"""Sample-quality metrics that need no download: Frechet distance, KID and mode coverage.

* ``fd_classifier``: the Frechet distance between Gaussians fitted to the penultimate features of the
  project's own Fashion-MNIST classifier (``wgan_lit.classifier``) on generated and real images
  (training: 10,000 training images; evaluate: the test set, see ``reference_images``);
  FID's formula with a domain feature extractor. 0 = same mean and covariance; lower is better.
* ``kid``: the kernel inception distance (unbiased MMD^2, cubic polynomial kernel) on the same features,
  averaged over random subsets; unbiased, so comparable across sample counts, and near 0 for equal
  distributions (it can dip slightly below 0).
* ``coverage``: the normalized entropy of the classifier's predicted class histogram of the samples:
  1 = all ten classes equally often, 0 = every sample is one class (mode collapse).
* ``fid_inception`` / ``kid_inception``: the usual Inception-v3 FID and KID, computed only when the
  weights are on disk (a config path or the torch hub cache); never downloaded.

The Frechet distance and KID are torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``
with the feature extractor swapped. :class:`SampleQuality` holds the real statistics (computed once) and
scores batches of generated images; :class:`SampleQualityCallback` runs it during training.
"""

from __future__ import annotations

import math
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

from wgan_lit import classifier as clf
from wgan_lit.classifier import CLASSES, ClassifierError, FashionClassifier
from wgan_lit.config import SAMPLE_METRICS, DataConfig, MetricsConfig
from wgan_lit.data import resize_uint8, to_unit_range
from wgan_lit.fashion_mnist import load_fashion_mnist, locate_fashion_mnist

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity downloads
MAX_REFERENCE = 10_000  # real images the statistics are computed from (= the whole Fashion-MNIST test set)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generated images in [-1, 1] -> uint8 [0, 255], as they would be saved: real and fake are then scored
    through the same quantization."""
    return images.add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)


def find_inception_weights(configured: str | Path | None = None, download_from: str = ""
                           ) -> tuple[Path | None, str]:
    """(path, "") of the Inception weights on disk, or (None, why not). Downloads only when ``download_from``
    (metrics.inception_download=true gives metrics.inception_url) and the weights are not in the cache."""
    if not _TORCH_FIDELITY_AVAILABLE:
        return None, "torch-fidelity is not installed (pip install 'wgan_lit[inception]')"
    if configured:
        path = Path(configured).expanduser()
        return (
            (path, "") if path.is_file() else (None, f"metrics.inception_weights={configured} does not exist")
        )
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if not path.is_file() and download_from:
        download_inception_weights(download_from, path)
    if path.is_file():
        return path, ""
    return None, (
        f"no {INCEPTION_WEIGHTS_FILE} in the torch hub cache ({path.parent}); put it there, set "
        "metrics.inception_weights=PATH, or fetch it once with metrics.inception_download=true"
    )


def download_inception_weights(url: str, path: Path) -> None:
    """Fetch ``url`` to ``path`` with a progress bar, checking the sha256 prefix its file name ends in (torch
    hub's convention); nothing is left at ``path`` unless the check passed."""
    match = re.search(r"-([a-f0-9]{8,})\.", Path(urlparse(url).path).name)
    if match is None:
        raise ClassifierError(f"metrics.inception_url={url}: its file name carries no sha256 prefix "
                              "(name-<hex>.pth), so the download could not be checked")
    path.parent.mkdir(parents=True, exist_ok=True)
    notice(f"downloading the Inception weights once: {url} -> {path}")
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=match.group(1), progress=True)
    except (RuntimeError, OSError, ValueError) as err:  # a hash mismatch is a RuntimeError; network: URLError
        raise ClassifierError(f"metrics.inception_url={url}: the download failed ({type(err).__name__}: "
                              f"{str(err).splitlines()[0]}); nothing was written to {path}") from err


class ClassifierFeatures(nn.Module):
    """What torchmetrics calls as its feature extractor: uint8 images -> the classifier's hidden layer."""

    def __init__(self, classifier: FashionClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features  # spares torchmetrics a dummy forward pass to find it
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(to_unit_range(images))


class InceptionFeatures(nn.Module):
    """torchmetrics' Inception-v3 loaded from a file on disk, for uint8 images with 1 or 3 channels (resized
    to 299x299 inside). ``dims``: which layer, as torchmetrics' ``feature`` (2048 = the standard FID)."""

    def __init__(self, weights: str | Path, dims: int = 2048) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        # An explicit path: torch-fidelity would download the weights if it were None.
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=[str(dims)], feature_extractor_weights_path=str(weights)
        )
        self.num_features = dims

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)


class ExtractOnce(nn.Module):
    """FID and KID are updated with the same batch one after the other: extract its features only once."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.num_features = extractor.num_features
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # holding the input keeps `is` sound
        self.eval()

    def train(self, mode: bool = True) -> ExtractOnce:
        return super().train(False)  # BatchNorm and dropout stay in inference mode whatever calls .train()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not images:
            self._last = (images, self.extractor(images))
        return self._last[1]

    def forget(self) -> None:
        self._last = None


class SampleQuality:
    """Scores generated images against real ones fixed at construction.

    ``real`` is a uint8 tensor (N, C, H, W) at the model's image size. ``classifier`` gives ``fd_classifier``,
    ``kid`` and ``coverage`` (Fashion-MNIST only); ``inception_weights`` adds ``fid_inception`` and
    ``kid_inception``. The real features are extracted once; :meth:`score` extracts only the fakes'.
    """

    def __init__(
        self,
        real: torch.Tensor,
        classifier: FashionClassifier | None = None,
        inception_weights: str | Path | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        seed: int = 0,
        batch_size: int = 500,
        device: str | torch.device = "cpu",
        inception_dims: int = 2048,
    ) -> None:
        if classifier is None and inception_weights is None:
            raise ValueError("SampleQuality needs a classifier, Inception weights or both")
        if real.dtype != torch.uint8 or real.ndim != 4:
            raise ValueError(f"real images must be uint8 (N, C, H, W), got {real.dtype} {tuple(real.shape)}")
        self.device, self.seed, self.batch_size = torch.device(device), seed, batch_size
        self.kid_subset_size = kid_subset_size
        self.n_real = len(real)
        self.classifier = classifier.to(self.device).eval() if classifier is not None else None
        # name -> (FID, KID) pair sharing one extractor; sync_on_compute=False because only rank 0 scores.
        self.pairs: dict[str, tuple[FrechetInceptionDistance, KernelInceptionDistance]] = {}
        if classifier is not None:
            self.pairs["classifier"] = self._pair(ClassifierFeatures(self.classifier), kid_subsets)
        if inception_weights is not None:
            self.pairs["inception"] = self._pair(
                InceptionFeatures(inception_weights, inception_dims), kid_subsets
            )
        with torch.no_grad():
            for fid, kid in self.pairs.values():
                for i in range(0, len(real), batch_size):
                    chunk = real[i : i + batch_size].to(self.device)
                    fid.update(chunk, real=True)
                    kid.update(chunk, real=True)
                fid.inception.forget()

    def _pair(
        self, extractor: nn.Module, kid_subsets: int
    ) -> tuple[FrechetInceptionDistance, KernelInceptionDistance]:
        extractor = ExtractOnce(extractor)
        fid = FrechetInceptionDistance(feature=extractor, reset_real_features=False, sync_on_compute=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            kid = KernelInceptionDistance(
                feature=extractor, subsets=kid_subsets, reset_real_features=False, sync_on_compute=False
            )
        return fid.to(self.device), kid.to(self.device)

    @property
    def names(self) -> list[str]:
        """The scalar names :meth:`score` returns."""
        out = ["fd_classifier", "kid", "kid_std", "coverage"] if self.classifier is not None else []
        return out + (
            ["fid_inception", "kid_inception", "kid_inception_std"] if "inception" in self.pairs else []
        )

    @torch.no_grad()
    def score(self, fake: torch.Tensor) -> dict[str, float]:
        """Metrics of generated images: uint8 [0, 255] or float [-1, 1], shape (N, C, H, W), N >= 2."""
        if fake.is_floating_point():
            fake = to_uint8(fake)
        if len(fake) < 2:
            raise ValueError(f"need at least 2 generated images, got {len(fake)}")
        out: dict[str, float] = {}
        counts = torch.zeros(len(CLASSES), dtype=torch.long)
        for name, (fid, kid) in self.pairs.items():
            fid.reset()  # forgets the previous fakes, keeps the real statistics
            kid.reset()
            for i in range(0, len(fake), self.batch_size):
                chunk = fake[i : i + self.batch_size].to(self.device)
                fid.update(chunk, real=False)
                kid.update(chunk, real=False)
                if name == "classifier":
                    preds = self.classifier.head(fid.inception(chunk)).argmax(1)  # the features just used
                    counts += torch.bincount(preds.cpu(), minlength=len(CLASSES))
            fid.inception.forget()
            kid.subset_size = min(self.kid_subset_size, self.n_real, len(fake))
            kid_mean, kid_std = kid_compute(kid, self.seed)
            prefix = {
                "classifier": ("fd_classifier", "kid"),
                "inception": ("fid_inception", "kid_inception"),
            }[name]
            out[prefix[0]] = float(fid.compute())
            out[prefix[1]], out[f"{prefix[1]}_std"] = float(kid_mean), float(kid_std)
        if self.classifier is not None:
            out["coverage"] = normalized_entropy(counts)
            self.class_fractions = (counts.double() / counts.sum()).tolist()
        return {k: out[k] for k in self.names}


def kid_compute(kid: KernelInceptionDistance, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``kid.compute()`` with its random subsets drawn from a private generator seeded with ``seed``.

    torchmetrics draws them from the global RNG; seeding that would reset CUDA's stream too (torch.manual_seed
    seeds every device), and with it the training's noise. The same seed gives the same subsets as
    ``torch.manual_seed(seed); kid.compute()``."""
    real, fake = dim_zero_cat(kid.real_features), dim_zero_cat(kid.fake_features)
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(kid.subsets):
        f_real = real[torch.randperm(len(real), generator=gen)[: kid.subset_size]]
        f_fake = fake[torch.randperm(len(fake), generator=gen)[: kid.subset_size]]
        scores.append(poly_mmd(f_real, f_fake, kid.degree, kid.gamma, kid.coef))
    stacked = torch.stack(scores)
    return stacked.mean(), stacked.std(unbiased=False)


def normalized_entropy(counts: torch.Tensor) -> float:
    """Entropy of a histogram divided by log(number of bins): 1 = uniform, 0 = one bin."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float((p * p.reciprocal().log()).sum() / math.log(len(counts)))  # p log(1/p): never -0.0


def notice(message: str) -> None:
    """One line on stderr, for what is skipped and why (the run goes on)."""
    print(f"[wgan_lit.metrics] {message}", file=sys.stderr, flush=True)


class SampleQualityCallback(L.Callback):
    """Every ``every_n_gen_steps`` generator steps and/or every ``every_n_seconds`` of training (and at step 0
    and the end), score ``n_samples`` images.

    Rank 0 generates from fixed noise (``seed``) and scores them; the scores are broadcast so every rank
    logs the same values. They go to the loggers as ``metrics/<name>`` with step = generator step, and into
    ``trainer.callback_metrics`` (for ModelCheckpoint(monitor="metrics/fd_classifier") and run summaries).
    With an averaged generator (``model.ema_decay``) those are its scores, and the raw generator's go to
    ``metrics_raw/<name>``. ``make_scorer(device)`` builds the :class:`SampleQuality` once, at the start.
    """

    def __init__(
        self,
        make_scorer: Callable[[torch.device], SampleQuality | None],
        every_n_gen_steps: int,
        n_samples: int = 5000,
        seed: int = 0,
        batch_size: int = 500,
        every_n_seconds: float = 0.0,
    ) -> None:
        self.make_scorer, self.every, self.seconds = make_scorer, every_n_gen_steps, every_n_seconds
        self.n_samples, self.seed, self.batch_size = n_samples, seed, batch_size
        self.scorer: SampleQuality | None = None
        self._last_step = -1
        self._last_time = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:  # the step a checkpoint holds was scored before it was written (same batch end)
            self._last_step = pl_module.gen_step
        if trainer.is_global_zero and self.scorer is None and self.make_scorer is not None:
            # Initialising (or, the first time, training) the classifier draws random numbers: not the run's.
            with torch.random.fork_rng(devices=[]):
                self.scorer = self.make_scorer(pl_module.device)
            self.make_scorer = None  # built once, even when it came back None

    def _is_last_batch(self, trainer: L.Trainer) -> bool:
        last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs >= 1
        return trainer.should_stop or (trainer.is_last_batch and last_epoch)

    def _due(self, trainer: L.Trainer, step: int) -> bool:
        if (self.every > 0 and step % self.every == 0) or self._is_last_batch(trainer):
            return True
        if self.seconds <= 0 or step % 10:
            return False
        # Rank 0's clock decides, every 10th generator step, so that every rank takes part in the broadcast.
        return bool(trainer.strategy.broadcast(time.monotonic() - self._last_time >= self.seconds, src=0))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The untrained generator, before the first batch: with n_critic=1 no batch ends at step 0.
        if pl_module.gen_step == 0 and self._last_step < 0:
            self._score(trainer, pl_module, 0)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = pl_module.gen_step
        if step != self._last_step and self._due(trainer, step):
            self._score(trainer, pl_module, step)

    def _score(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        self._last_step = step
        scores = self.evaluate(pl_module) if trainer.is_global_zero else None
        scores = trainer.strategy.broadcast(scores, src=0)
        self._last_time = time.monotonic()  # the interval is training time, not the evaluation's
        if not scores:
            return  # nothing could be computed (see the notice at the start)
        for logger in trainer.loggers:
            logger.log_metrics(scores, step=step)
        for name, value in scores.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, logger=False)

    @torch.no_grad()
    def evaluate(self, module: L.LightningModule) -> dict[str, float]:
        """``metrics/<name>`` (and ``metrics_raw/<name>`` with an averaged generator) of ``n_samples`` images
        from the fixed noise; draws no random numbers of the run's."""
        if self.scorer is None:
            return {}
        z = torch.randn(
            self.n_samples, module.hparams.latent_dim, generator=torch.Generator().manual_seed(self.seed)
        )
        out = {}
        averaged = getattr(module, "generator_ema", None) is not None
        for prefix, ema in [("metrics", True), ("metrics_raw", False)][: 2 if averaged else 1]:
            fake = torch.cat([to_uint8(module.generate(z[i : i + self.batch_size], ema=ema))
                              for i in range(0, len(z), self.batch_size)])
            out.update({f"{prefix}/{k}": v for k, v in self.scorer.score(fake).items()})
        return out


# ---- wiring: what train.py and evaluate.py call -------------------------------------------------------


def reference_images(data: DataConfig, image_size: int, datamodule: Any = None,
                     split: str = "train") -> torch.Tensor | None:
    """The real images scores are measured against, at the model's image size (resized as the training data
    is). Fashion-MNIST: ``split`` "train" (the first MAX_REFERENCE training images: what training chooses its
    best checkpoint by, so the test set stays unseen) or "test" (the whole test set: what evaluate reports).
    Other data sets: up to MAX_REFERENCE of the training images."""
    if data.name == "fashion_mnist":
        images, _ = load_fashion_mnist(*locate_fashion_mnist(data.root, split, data.download))
        return resize_uint8(images[:MAX_REFERENCE], image_size)
    images = getattr(datamodule, "images", None)
    return None if images is None else images[:MAX_REFERENCE]


def build_sample_quality(
    mc: MetricsConfig,
    data: DataConfig,
    image_size: int,
    device: str | torch.device = "cpu",
    datamodule: Any = None,
    split: str = "train",
) -> SampleQuality | None:
    """A SampleQuality with every metric available offline; a one-line notice for each one that is not.
    ``split``: the real images to compare with (see reference_images)."""
    classifier = None
    if data.name == "fashion_mnist":
        classifier = clf.load_or_build(mc.classifier_path or None, data.root, map_location=device)
    else:
        notice(
            f"fd_classifier, kid and coverage skipped: the classifier knows Fashion-MNIST, not {data.name}"
        )
    weights = None
    if mc.inception:
        weights, why = find_inception_weights(mc.inception_weights,
                                              mc.inception_url if mc.inception_download else "")
        if weights is None:
            notice(f"Inception FID/KID skipped: {why}. Continuing without them.")
    real = reference_images(data, image_size, datamodule, split)
    if real is None or (classifier is None and weights is None):
        notice("no sample-quality metric can be computed for this run; metrics/* will not be logged.")
        return None
    return SampleQuality(
        real, classifier, weights, mc.kid_subsets, mc.kid_subset_size, mc.seed, device=device
    )


def sample_quality_callbacks(
    mc: MetricsConfig, data: DataConfig, checkpoint_dir: str | Path, datamodule: Any = None
) -> list[L.Callback]:
    """The training-time callbacks for ``metrics.*``: none when off; else the scorer and, when
    ``metrics.checkpoint_monitor`` is set, a ModelCheckpoint keeping the best step as best-gen<N>.ckpt."""
    if mc.every_n_gen_steps <= 0 and mc.every_n_seconds <= 0:
        return []

    def make_scorer(device: torch.device) -> SampleQuality | None:
        return build_sample_quality(mc, data, data.image_size, device, datamodule)

    callbacks: list[L.Callback] = [
        SampleQualityCallback(make_scorer, mc.every_n_gen_steps, mc.n_samples, mc.seed,
                              every_n_seconds=mc.every_n_seconds)
    ]
    if mc.checkpoint_monitor:
        callbacks.append(best_checkpoint(checkpoint_dir, mc.checkpoint_monitor))
    return callbacks


def best_checkpoint(dirpath: str | Path, metric: str) -> ModelCheckpoint:
    """Keeps ``best-gen<N>-<metric><value>.ckpt``: the generator step that scored best on ``metric``."""
    # Lightning warns that, under manual optimization, such a checkpoint holds the state after the
    # optimizer step: that is the state the scores were measured on, so the warning does not apply.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n")
    return ModelCheckpoint(
        dirpath=dirpath,
        filename=f"best-gen{{gen_step:.0f}}-{metric}{{metrics/{metric}:.4f}}",
        auto_insert_metric_name=False,
        monitor=f"metrics/{metric}",
        mode=SAMPLE_METRICS[metric],
        save_top_k=1,
        # Checked after every batch, but it saves only when a fresh score beats the best one.
        every_n_train_steps=1,
        save_last=False,
    )
