"""Score a checkpoint: ``python -m wgan_lit.evaluate checkpoint=PATH [key=value ...] [--json]``.

Prints one table of the sample-quality metrics (``wgan_lit.metrics``) of ``n_samples`` images drawn from
fixed noise (``seed``), or one JSON object with ``--json``. Keys (defaults in :class:`EvaluateConfig`):
checkpoint, n_samples, seed, data_root, classifier_path, inception, inception_weights, kid_subsets,
kid_subset_size, device. The data set and its folder are read from the run's ``.hydra/config.yaml`` when the
checkpoint sits in a run directory; ``data_root=`` overrides the folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wgan_lit.classifier import CLASSES, ClassifierError
from wgan_lit.config import SAMPLE_METRICS, DataConfig, MetricsConfig
from wgan_lit.data import DataError
from wgan_lit.metrics import build_sample_quality, find_inception_weights, to_uint8
from wgan_lit.module import WGAN


@dataclass
class EvaluateConfig:
    checkpoint: str = MISSING
    n_samples: int = 5000  # as metrics.n_samples in training, so the numbers compare
    seed: int = 0
    data_root: str = ""  # "" = the run's data.root (or "data"); the system Fashion-MNIST is found either way
    classifier_path: str = ""  # "" = $WGAN_LIT_CACHE or ~/.cache/wgan_lit/fmnist_classifier.pt
    inception: bool = True
    inception_weights: str = ""
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    device: str = "auto"  # auto = cuda when available
    batch_size: int = 500


class EvaluateError(ValueError):
    """A bad command line or checkpoint; the message says what to fix."""


def parse(argv: list[str]) -> tuple[EvaluateConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m wgan_lit.evaluate", description=__doc__.split("\n\n")[1])
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. checkpoint=PATH n_samples=10000"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise EvaluateError(f"{bad[0]!r} is not key=value; write checkpoint=PATH")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(EvaluateConfig), OmegaConf.from_dotlist(args.overrides))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        key = f"{err.full_key}: " if getattr(err, "full_key", None) else ""
        raise EvaluateError(
            f"{key}{str(err).splitlines()[0]} (keys: {', '.join(EvaluateConfig.__dataclass_fields__)})"
        ) from err
    assert isinstance(obj, EvaluateConfig)
    if obj.n_samples < 2 or obj.kid_subset_size < 2:
        raise EvaluateError(
            f"n_samples={obj.n_samples}, kid_subset_size={obj.kid_subset_size}: expected integers >= 2"
        )
    return obj, args.json


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
    if not path.is_file():
        raise EvaluateError(
            f"checkpoint={cfg.checkpoint}: no such file (a run writes <run dir>/checkpoints/last.ckpt)"
        )
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if cfg.device == "auto"
        else cfg.device
    )
    try:
        model = WGAN.load_from_checkpoint(path, map_location=device).eval()
    except Exception as err:  # a non-checkpoint file raises whatever its unpickling hits
        raise EvaluateError(
            f"checkpoint={cfg.checkpoint}: not a wgan_lit checkpoint ({type(err).__name__}: {err})"
        ) from err
    data = run_data_config(path, cfg.data_root)
    data.image_size = model.hparams.image_size
    datamodule = None
    if data.name != "fashion_mnist":  # other data sets score against their own training images
        from wgan_lit.train import build_datamodule

        datamodule = build_datamodule(data)
        datamodule.setup("fit")
    mc = MetricsConfig(
        n_samples=cfg.n_samples,
        seed=cfg.seed,
        classifier_path=cfg.classifier_path,
        inception=cfg.inception,
        inception_weights=cfg.inception_weights,
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=cfg.kid_subset_size,
    )
    scorer = build_sample_quality(mc, data, data.image_size, device, datamodule)
    skipped: dict[str, str] = {}
    if not cfg.inception:
        skipped["fid_inception"] = skipped["kid_inception"] = "inception=false"
    elif why := find_inception_weights(cfg.inception_weights)[1]:
        skipped["fid_inception"] = skipped["kid_inception"] = why
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "gen_step": model.gen_step,
        "n_samples": cfg.n_samples,
        "seed": cfg.seed,
        "data": data.name,
        "n_real": 0,
        "metrics": {},
        "class_fractions": {},
        "skipped": skipped,
    }
    if scorer is None:
        return result
    z = torch.randn(
        cfg.n_samples, model.hparams.latent_dim, generator=torch.Generator().manual_seed(cfg.seed)
    )
    fake = torch.cat(
        [to_uint8(model.generate(z[i : i + cfg.batch_size])) for i in range(0, len(z), cfg.batch_size)]
    )
    result["metrics"] = scorer.score(fake)
    result["n_real"] = scorer.n_real
    if scorer.classifier is not None:
        result["class_fractions"] = dict(zip(CLASSES, scorer.class_fractions, strict=True))
    return result


def table(result: dict[str, Any]) -> str:
    """The result as one aligned plain-text table."""
    m = result["metrics"]
    rows = [("metric", "value", "better", "notes")]
    for name, mode in SAMPLE_METRICS.items():
        better = "lower" if mode == "min" else "higher"
        if name in m:
            note = f"+- {m[name + '_std']:.4f} (std over KID subsets)" if name + "_std" in m else ""
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
        f"seed {result['seed']}, vs {result['n_real']} real {result['data']} images"
    )
    return head + "\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, as_json = parse(sys.argv[1:] if argv is None else argv)
        result = evaluate(cfg)
    except (EvaluateError, DataError, ClassifierError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if as_json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
