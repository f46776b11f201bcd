"""The Fashion-MNIST classifier behind the offline metrics: ``python -m wgan_lit.classifier [out=PATH] [epochs=N]``
trains it on the real training set and saves it with its test accuracy (the metrics build it on first use)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from filelock import FileLock
from torch import nn

from wgan_lit import cli
from wgan_lit.checkpointing import atomic_torch_save
from wgan_lit.config import DataError, declared_rules, rule, user_cache_dir
from wgan_lit.data import to_unit_range
from wgan_lit.fashion_mnist import load_fashion_mnist, locate_fashion_mnist

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MIN_ACCURACY = 0.90  # on the real test set; below this the features are not trusted


def default_path() -> Path:
    return user_cache_dir() / "fmnist_classifier.pt"


class ClassifierError(RuntimeError):
    """The classifier file is missing, unreadable or not good enough; the message says how to fix it."""


class FashionClassifier(nn.Module):
    """Two strided conv blocks and a hidden layer; ``features`` (the hidden layer) is the feature space."""

    def __init__(self, width: int = 32, num_features: int = 128) -> None:
        super().__init__()
        self.width, self.num_features = width, num_features
        # Strided 5x5 convolutions instead of conv + pooling: about 4x cheaper to train on a CPU. 28 -> 14 -> 7.
        blocks = [nn.Sequential(nn.Conv2d(c_in, c_out, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(c_out),
                                nn.ReLU(inplace=True)) for c_in, c_out in ((1, width), (width, 2 * width))]
        self.body = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(2 * width * 7 * 7, num_features), nn.ReLU(True))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(num_features, len(CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, num_features) of images in [-1, 1], shape (N, 1, H, W)."""
        if x.shape[-2:] != (28, 28):  # other image sizes are resized to Fashion-MNIST's
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@torch.no_grad()
def accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of a classifier on the CPU for uint8 images (N, 1, H, W)."""
    return sum(int((model.eval()(to_unit_range(images[i : i + batch])).argmax(1) == labels[i : i + batch]).sum())
               for i in range(0, len(images), batch)) / len(images)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, epochs: int = 4, batch_size: int = 256,
                     lr: float = 4e-3, seed: int = 0, width: int = 32, num_features: int = 128,
                     log: Callable[..., Any] = lambda *a, **k: None) -> FashionClassifier:
    """A FashionClassifier fit on the CPU to uint8 images (N, 1, 28, 28) and labels, deterministic for a seed."""
    with torch.random.fork_rng(devices=[]):  # its draws leave the caller's as they were; manual_seed would reseed CUDA
        torch.default_generator.manual_seed(seed)
        model, steps = FashionClassifier(width, num_features), len(images) // batch_size
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        # One-cycle: a high learning rate early, annealed to zero, converges in few epochs.
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps))
        gen = torch.Generator().manual_seed(seed)
        for epoch in range(epochs):
            for idx in torch.randperm(len(images), generator=gen)[: steps * batch_size].view(steps, batch_size):
                loss = F.cross_entropy(model.train()(to_unit_range(images[idx])), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            log(f"epoch {epoch + 1}/{epochs}: last batch loss {loss.item():.3f}", flush=True)
    return model.eval()


def save(model: FashionClassifier, path: str | Path, test_accuracy: float, **info: Any) -> Path:
    atomic_torch_save({"format": 1, "width": model.width, "num_features": model.num_features,
                       "state_dict": model.state_dict(), "test_accuracy": test_accuracy, **info}, path)
    return Path(path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> FashionClassifier:
    """A saved classifier in eval mode; one whose recorded test accuracy is too low is refused."""
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
        model = FashionClassifier(blob["width"], blob["num_features"])
        model.load_state_dict(blob["state_dict"])
    except Exception as err:  # torch.load and load_state_dict raise many types for a bad file
        raise ClassifierError(f"{path}: not a wgan_lit classifier ({type(err).__name__}: {str(err).splitlines()[0]})"
                              ". Delete it and run `python -m wgan_lit.classifier` to train a new one.") from err
    if (acc := blob.get("test_accuracy", 0.0)) < MIN_ACCURACY:
        raise ClassifierError(f"{path}: test accuracy {acc:.3f} is below {MIN_ACCURACY:.2f}; retrain it with "
                              f"`python -m wgan_lit.classifier out={path}`.")
    model.test_accuracy = float(acc)
    return model.to(map_location).eval()


def build(out: str | Path | None = None, data_root: str | Path = "data", epochs: int = 4, seed: int = 0,
          log: bool = True) -> None:
    """Train on the real training set, measure on the real test set, save to ``out`` (default: default_path())."""
    out, start, say = Path(out) if out else default_path(), time.perf_counter(), print if log else lambda *a, **k: None
    (x, y), (test_x, test_y) = (load_fashion_mnist(*locate_fashion_mnist(data_root, s)) for s in ("train", "test"))
    model = train_classifier(x, y, epochs=epochs, seed=seed, log=say)
    acc, seconds = accuracy(model, test_x, test_y), time.perf_counter() - start
    say(f"test accuracy {acc:.4f} after {epochs} epochs ({seconds:.0f} s)", flush=True)
    if acc < MIN_ACCURACY:
        raise ClassifierError(f"the classifier reached only {acc:.3f} test accuracy (< {MIN_ACCURACY:.2f}) in "
                              f"{epochs} epochs; try epochs={epochs + 2}.")
    save(model, out, acc, epochs=epochs, seed=seed, train_seconds=round(seconds, 1))
    say(f"saved {out}")


def load_or_build(path: str | Path | None = None, data_root: str | Path = "data",
                  map_location: str | torch.device = "cpu") -> FashionClassifier:
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
class ClassifierConfig:  # the keys of python -m wgan_lit.classifier
    out: str = ""  # where to save it; "" = $WGAN_LIT_CACHE or ~/.cache/wgan_lit/fmnist_classifier.pt
    data_root: str = "data"  # the Fashion-MNIST IDX files (/usr/share/datasets/fashion-mnist is looked in too)
    epochs: int = rule(4, ge=1)
    seed: int = 0


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(ClassifierConfig, sys.argv[1:] if argv is None else argv, prog="wgan_lit.classifier",
                    doc=__doc__, check=lambda c: cli.problems(declared_rules(c)))
    try:
        build(cfg.out or None, cfg.data_root, cfg.epochs, cfg.seed)
    except (DataError, ClassifierError) as err:
        cli.fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
