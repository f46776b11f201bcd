"""A small Fashion-MNIST classifier: the domain feature extractor behind the offline sample-quality metrics.

Inception-v3 features (FID's usual extractor) need weights this project cannot download at run time, and
they were learned on ImageNet photos, not 28x28 clothing. This CNN is trained on the real Fashion-MNIST
training set in about a minute on a CPU; its penultimate layer gives the features of the Frechet distance
and KID, its predictions the class histogram of mode coverage (see ``wgan_lit.metrics``).

``python -m wgan_lit.classifier [out=PATH] [epochs=N]`` trains it and saves it; the metrics build it on
first use when the file is missing. The file records its test accuracy, and one below ``MIN_ACCURACY`` is
refused.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from wgan_lit import cli
from wgan_lit.checkpointing import atomic_torch_save
from wgan_lit.config import DataError, user_cache_dir
from wgan_lit.data import to_unit_range
from wgan_lit.fashion_mnist import load_fashion_mnist, locate_fashion_mnist

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
INPUT_SIZE = 28  # other image sizes are resized to this before classification
MIN_ACCURACY = 0.90  # on the real test set; below this the features are not trusted
FORMAT_VERSION = 1


def default_path() -> Path:
    """Where the trained classifier is cached: in :func:`~wgan_lit.config.user_cache_dir`."""
    return user_cache_dir() / "fmnist_classifier.pt"


class ClassifierError(RuntimeError):
    """The classifier file is missing, unreadable or not good enough; the message says how to fix it."""


class FashionClassifier(nn.Module):
    """Two strided conv blocks and a hidden layer; ``features`` (the hidden layer) is the feature space."""

    def __init__(self, width: int = 32, num_features: int = 128) -> None:
        super().__init__()
        self.width, self.num_features = width, num_features

        def block(c_in: int, c_out: int) -> nn.Sequential:
            # Strided 5x5 convolutions instead of conv + pooling: about 4x cheaper to train on a CPU.
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 5, stride=2, padding=2, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            )

        self.body = nn.Sequential(
            block(1, width),
            block(width, 2 * width),
            nn.Flatten(),  # 28 -> 14 -> 7
            nn.Linear(2 * width * 7 * 7, num_features),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(num_features, len(CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, num_features) of images in [-1, 1], shape (N, 1, H, W)."""
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(
                x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False
            )
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.head(self.dropout(self.features(x)))


@torch.no_grad()
def accuracy(
    model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Top-1 accuracy on uint8 images (N, 1, H, W)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(images), batch_size):
        x = to_unit_range(images[i : i + batch_size].to(device))
        correct += int((model(x).argmax(1).cpu() == labels[i : i + batch_size]).sum())
    return correct / len(images)


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    epochs: int = 4,
    batch_size: int = 256,
    lr: float = 4e-3,
    seed: int = 0,
    width: int = 32,
    num_features: int = 128,
    device: str | torch.device = "cpu",
    log: bool = False,
) -> FashionClassifier:
    """Fit a FashionClassifier on uint8 images (N, 1, 28, 28) and labels; deterministic for a seed on CPU.
    Its random draws (initial weights, dropout, order) leave the caller's random streams as they were."""
    device = torch.device(device)
    # Seeded and restored on this device only: torch.manual_seed would reseed every CUDA device (a run's noise).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.default_generators[device.index or 0].manual_seed(seed)
        model = FashionClassifier(width, num_features).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = len(images) // batch_size
        # One-cycle: a high learning rate early, annealed to zero, converges in few epochs.
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch))
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(images), generator=gen)
            for i in range(steps_per_epoch):
                idx = order[i * batch_size : (i + 1) * batch_size]
                x = to_unit_range(images[idx].to(device))
                loss = F.cross_entropy(model(x), labels[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if log:
                print(f"epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}", flush=True)
    return model.eval()


def save(model: FashionClassifier, path: str | Path, test_accuracy: float, **info: Any) -> Path:
    blob = {"format": FORMAT_VERSION, "width": model.width, "num_features": model.num_features,
            "state_dict": model.state_dict(), "test_accuracy": test_accuracy, **info}
    atomic_torch_save(blob, path)  # a run that reads the cache never sees half a file
    return Path(path)


def load(
    path: str | Path, map_location: str | torch.device = "cpu", min_accuracy: float = MIN_ACCURACY
) -> FashionClassifier:
    """Load a saved classifier in eval mode, refusing one whose recorded test accuracy is too low."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        model = FashionClassifier(blob["width"], blob["num_features"])
        model.load_state_dict(blob["state_dict"])
    except Exception as err:  # torch.load and load_state_dict raise many types for a bad file
        raise ClassifierError(
            f"{path}: not a wgan_lit classifier ({type(err).__name__}: {err}). Delete it and "
            "run `python -m wgan_lit.classifier` to train a new one."
        ) from err
    if blob.get("test_accuracy", 0.0) < min_accuracy:
        raise ClassifierError(
            f"{path}: test accuracy {blob.get('test_accuracy', 0.0):.3f} is below "
            f"{min_accuracy:.2f}; retrain it with `python -m wgan_lit.classifier out={path}`."
        )
    model.test_accuracy = float(blob["test_accuracy"])
    return model.to(map_location).eval()


def build(
    out: str | Path | None = None,
    data_root: str | Path = "data",
    epochs: int = 4,
    seed: int = 0,
    log: bool = True,
) -> tuple[FashionClassifier, float]:
    """Train on the real training set, measure on the real test set, save to ``out``; (model, accuracy)."""
    out = Path(out) if out else default_path()
    train_x, train_y = load_fashion_mnist(*locate_fashion_mnist(data_root, "train"))
    test_x, test_y = load_fashion_mnist(*locate_fashion_mnist(data_root, "test"))
    start = time.perf_counter()
    model = train_classifier(train_x, train_y, epochs=epochs, seed=seed, log=log)
    acc = accuracy(model, test_x, test_y)
    seconds = time.perf_counter() - start
    if log:
        print(f"test accuracy {acc:.4f} after {epochs} epochs ({seconds:.0f} s)", flush=True)
    if acc < MIN_ACCURACY:
        raise ClassifierError(
            f"the classifier reached only {acc:.3f} test accuracy (< {MIN_ACCURACY:.2f}) "
            f"in {epochs} epochs; try epochs={epochs + 2}."
        )
    save(model, out, acc, epochs=epochs, seed=seed, train_seconds=round(seconds, 1))
    if log:
        print(f"saved {out}", flush=True)
    return model, acc


def load_or_build(
    path: str | Path | None = None, data_root: str | Path = "data", map_location: str | torch.device = "cpu"
) -> FashionClassifier:
    """The cached classifier at ``path`` (default: ``default_path()``), trained first if it is missing."""
    path = Path(path) if path else default_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{path}.lock"):  # one process (run, rank) trains it; the others wait, then read it
            if not path.is_file():
                print(f"Training the Fashion-MNIST classifier for the sample-quality metrics (once; cached in "
                      f"{path})", file=sys.stderr, flush=True)
                build(path, data_root, log=False)
    return load(path, map_location)


@dataclass
class ClassifierConfig:
    """The keys of ``python -m wgan_lit.classifier``."""

    out: str = ""  # where to save it; "" = $WGAN_LIT_CACHE or ~/.cache/wgan_lit/fmnist_classifier.pt
    data_root: str = "data"  # the Fashion-MNIST IDX files (/usr/share/datasets/fashion-mnist is looked in too)
    epochs: int = 4
    seed: int = 0


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(ClassifierConfig, sys.argv[1:] if argv is None else argv, prog="wgan_lit.classifier",
                    doc=__doc__, check=lambda c: [] if c.epochs >= 1 else [f"epochs={c.epochs}: expected >= 1"])
    try:
        build(cfg.out or None, cfg.data_root, cfg.epochs, cfg.seed)
    except (DataError, ClassifierError) as err:
        cli.fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
