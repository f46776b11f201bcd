"""Score a checkpoint: ``python -m wgan_lit.evaluate [checkpoint=]PATH [key=value ...]``.

Examples::

    python -m wgan_lit.evaluate checkpoint=RUN/checkpoints/last.ckpt
    python -m wgan_lit.evaluate checkpoint=RUN/checkpoints/last.ckpt metrics.n_samples=10000 json=true

Prints one table of the sample-quality metrics (``wgan_lit.metrics``) of ``metrics.n_samples`` images drawn
from fixed noise (``metrics.seed``), or one JSON object with ``json=true``. The ``metrics.*`` keys are those of
training (``conf/metrics``), with the same defaults, so the numbers compare; ``metrics.every_n_gen_steps``,
``metrics.every_n_seconds`` and ``metrics.checkpoint_monitor`` only matter in training. A checkpoint with an
averaged generator (``model.ema_decay``) is scored with it (``metrics``) and without it (``metrics_raw``).
The data set and its folder are read from the run's ``.hydra/config.yaml`` when the checkpoint sits in a run
directory; ``data_root=`` overrides the folder.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf

from wgan_lit import cli
from wgan_lit.checkpointing import CheckpointError
from wgan_lit.classifier import CLASSES, ClassifierError
from wgan_lit.config import (
    IMAGE_SIZES,
    SAMPLE_METRICS,
    ConfigError,
    DataConfig,
    DataError,
    MetricsConfig,
    metrics_rules,
)
from wgan_lit.data import resize_uint8
from wgan_lit.generate import device_problem, latents, load_generator
from wgan_lit.metrics import build_sample_quality, find_inception_weights, to_uint8


@dataclass
class EvaluateConfig:
    """The keys of ``python -m wgan_lit.evaluate``: the one home of their defaults (``metrics.*``: MetricsConfig)."""

    checkpoint: str = MISSING  # a .ckpt file of a run, e.g. RUN/checkpoints/last.ckpt
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # n_samples, seed, classifier, Inception, KID
    data_root: str = ""  # "" = the run's data.root (or "data"); the system Fashion-MNIST is found either way
    device: str = "auto"  # auto (cuda when one is visible, else cpu), cpu or cuda
    batch_size: int = 500  # images generated at a time
    # 0 = the model's; else samples and real images are resized to this size first: one ruler for models of
    # different sizes (real images resized 28 -> 32 -> 28 are themselves ~25 fd_classifier from the originals)
    image_size: int = 0
    json: bool = False  # print one JSON object instead of the table


class EvaluateError(ValueError):
    """A checkpoint or run that cannot be scored; the message says what to fix."""


def check(cfg: EvaluateConfig) -> list[str]:
    """One line per value the types allow but the command does not; ``metrics.*`` as training checks them."""
    rules = [
        *metrics_rules(cfg.metrics),
        ("batch_size", cfg.batch_size, cfg.batch_size >= 1, "an integer >= 1"),
        ("image_size", cfg.image_size, cfg.image_size == 0 or cfg.image_size in IMAGE_SIZES,
         f"0 (the model's) or one of {IMAGE_SIZES}"),
    ]
    bad = [f"{key}={value!r}: expected {expected}" for key, value, ok, expected in rules if not ok]
    if problem := device_problem(cfg.device):
        bad.append(problem)
    return bad


def run_data_config(checkpoint: Path, data_root: str) -> DataConfig:
    """The data section of the run that wrote ``checkpoint`` (<run>/checkpoints/x.ckpt), else the defaults."""
    data = DataConfig()
    run_config = checkpoint.resolve().parent.parent / ".hydra" / "config.yaml"
    if run_config.is_file():
        section = OmegaConf.load(run_config).get("data")
        if section is not None:
            known = {k: v for k, v in OmegaConf.to_container(section).items() if hasattr(data, k)}
            data = DataConfig(**known)
    if data_root:
        data.root = data_root
    return data


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Load the checkpoint, generate, score; the result as one JSON-ready dict."""
    path = Path(cfg.checkpoint)
    mc = cfg.metrics
    model = load_generator(path, cfg.device)  # CheckpointError names the file and what is wrong with it
    device = model.device
    data = run_data_config(path, cfg.data_root)
    data.image_size = cfg.image_size or model.hparams.image_size
    datamodule = None
    if data.name != "fashion_mnist":  # other data sets score against their own training images
        from wgan_lit.data import DATA_MODULES, build_datamodule

        if data.name not in DATA_MODULES:
            raise EvaluateError(f"data.name={data.name!r} of the run's config: expected one of "
                                f"{', '.join(DATA_MODULES)}")
        datamodule = build_datamodule(data)
        datamodule.setup("fit")
    # Reported against the test set, which training never scores against (it chooses by training images).
    split = "test" if data.name == "fashion_mnist" else "train"
    scorer = build_sample_quality(mc, data, data.image_size, device, datamodule, split)
    skipped: dict[str, str] = {}
    if not mc.inception:
        skipped["fid_inception"] = skipped["kid_inception"] = "metrics.inception=false"
    elif why := find_inception_weights(mc.inception_weights, mc.inception_url if mc.inception_download else "")[1]:
        skipped["fid_inception"] = skipped["kid_inception"] = why
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "gen_step": model.gen_step,
        "n_samples": mc.n_samples,
        "image_size": data.image_size,
        "seed": mc.seed,
        "data": data.name,
        "n_real": 0,
        "real_split": split,
        "metrics": {},
        "class_fractions": {},
        "skipped": skipped,
    }
    if scorer is None:
        return result
    z = latents(model, mc.n_samples, mc.seed)  # the codes generate draws for the same seed

    def score(ema: bool) -> dict[str, float]:
        fake = torch.cat([to_uint8(model.generate(z[i : i + cfg.batch_size], ema=ema))
                          for i in range(0, len(z), cfg.batch_size)])
        return scorer.score(resize_uint8(fake, data.image_size))  # as the real images (no-op at the model's size)

    if model.generator_ema is not None:  # first, so class_fractions below are the averaged generator's
        result["metrics_raw"] = score(ema=False)
    result["metrics"] = score(ema=True)
    result["n_real"] = scorer.n_real
    if scorer.classifier is not None:
        result["class_fractions"] = dict(zip(CLASSES, scorer.class_fractions, strict=True))
    return result


def table(result: dict[str, Any]) -> str:
    """The result as one aligned plain-text table."""
    m, raw = result["metrics"], result.get("metrics_raw")
    rows = [("metric", "value", "better", "notes")]
    for name, mode in SAMPLE_METRICS.items():
        better = "lower" if mode == "min" else "higher"
        if name in m:
            note = f"+- {m[name + '_std']:.4f} (std over KID subsets)" if name + "_std" in m else ""
            if raw is not None:
                note = f"without EMA {raw[name]:.4f}" + (f"; {note}" if note else "")
            rows.append((name, f"{m[name]:.4f}", better, note))
        else:
            rows.append((name, "n/a", better, result["skipped"].get(name, "not available for this data set")))
    for i, (cls, frac) in enumerate(result["class_fractions"].items()):
        rows.append(
            (f"class {cls}", f"{frac:.4f}", "", "" if i else "share of the samples; 0.1 each = uniform")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
    lines.insert(1, "-" * (sum(widths) + 6 + len("notes")))
    head = (
        f"{result['checkpoint']} (generator step {result['gen_step']}): {result['n_samples']} samples, "
        f"seed {result['seed']}, vs {result['n_real']} real {result['data']} {result['real_split']} images"
        f" at {result['image_size']} x {result['image_size']}"
        + (", averaged generator (EMA)" if raw is not None else "")
    )
    return head + "\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(EvaluateConfig, sys.argv[1:] if argv is None else argv, prog="wgan_lit.evaluate",
                    doc=__doc__, check=check, path_key=("checkpoint", "a checkpoint"))
    try:
        result = evaluate(cfg)
    except (CheckpointError, EvaluateError, ConfigError, DataError, ClassifierError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if cfg.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
