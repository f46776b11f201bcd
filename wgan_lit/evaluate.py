"""Score a checkpoint: ``python -m wgan_lit.evaluate [checkpoint=]PATH [key=value ...]`` prints a table (json=true:
a JSON object) of the metrics of ``metrics.n_samples`` fixed-noise images (training's ``metrics.*`` keys), an average's
(``metrics``) beside the raw generator's (``metrics_raw``), against the data of the run's ``.hydra/config.yaml``."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from omegaconf import MISSING, OmegaConf

from wgan_lit import cli, data
from wgan_lit.checkpointing import CheckpointError
from wgan_lit.classifier import ClassifierError
from wgan_lit.config import IMAGE_SIZES, ConfigError, DataConfig, DataError, MetricsConfig, declared_rules, rule
from wgan_lit.generate import device_problem, load_generator
from wgan_lit.metrics import METRICS, build_sample_quality


@dataclass
class EvaluateConfig:  # the keys of python -m wgan_lit.evaluate; metrics.*: MetricsConfig's, their one home
    checkpoint: str = MISSING  # a .ckpt file of a run, e.g. RUN/checkpoints/last.ckpt
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # n_samples, seed, classifier, Inception, KID
    data_root: str = ""  # "" = the run's data.root (or "data"); the system Fashion-MNIST is found either way
    device: str = "auto"  # auto (cuda when one is visible, else cpu), cpu or cuda
    batch_size: int = rule(500, ge=1)  # images generated at a time
    image_size: int = rule(0, one_of=(0, *IMAGE_SIZES))  # 0 = the model's; else samples and real resized to it
    json: bool = False  # print one JSON object instead of the table


def run_data_config(checkpoint: Path, data_root: str) -> DataConfig:
    """The data section of the run that wrote ``checkpoint`` (<run>/checkpoints/x.ckpt), else the defaults."""
    run_config = checkpoint.resolve().parent.parent / ".hydra" / "config.yaml"
    section = dict(OmegaConf.load(run_config).get("data") or {}) if run_config.is_file() else {}
    known = {k: v for k, v in section.items() if k in DataConfig.__dataclass_fields__}  # not a later version's keys
    return DataConfig(**{**known, "root": data_root or known.get("root", DataConfig.root)})


def evaluate(cfg: EvaluateConfig) -> dict:
    """Load, generate, score against the data set's ``reference_split``: one JSON-ready dict."""
    path, mc = Path(cfg.checkpoint), cfg.metrics
    model = load_generator(path, cfg.device)  # CheckpointError names the file and what is wrong with it
    dc = replace(run_data_config(path, cfg.data_root), image_size=cfg.image_size or model.hparams.image_size)
    if dc.name not in data.DATAMODULES:
        raise ConfigError(f"data.name={dc.name!r} of the run's config: expected one of {', '.join(data.DATAMODULES)}")
    datamodule = data.build_datamodule(dc)
    scorer, skipped = build_sample_quality(mc, dc, datamodule, model.device)
    result = dict(checkpoint=str(path), gen_step=model.gen_step, n_samples=mc.n_samples, image_size=dc.image_size,
                  seed=mc.seed, data=dc.name, n_real=scorer.n_real if scorer else 0,
                  real_split=datamodule.reference_split, metrics={}, class_fractions={}, skipped=skipped)
    if scorer is not None:  # raw first, so that class_fractions are the averaged generator's
        result |= scorer.sample_scores(model, mc.n_samples, mc.seed, cfg.batch_size, dc.image_size)
        result["class_fractions"] = scorer.class_fractions
    return result


def table(result: dict) -> str:
    """The result as one aligned plain-text table."""
    r, m, raw = result, result["metrics"], result.get("metrics_raw") or {}
    rows = [("metric", "value", "better", "notes")]
    for name, metric in METRICS.items():
        std = f"+- {m[name + '_std']:.4f} (std over KID subsets)" if name + "_std" in m else ""
        notes = "; ".join(filter(None, [f"without EMA {raw[name]:.4f}" if name in raw else "", std]))
        rows.append((name, f"{m[name]:.4f}" if name in m else "n/a", "lower" if metric.better == "min" else "higher",
                     notes if name in m else r["skipped"].get(name, "not available for this data set")))
    rows += [(f"class {cls}", f"{frac:.4f}", "", "" if i else "share of the samples; 0.1 each = uniform")
             for i, (cls, frac) in enumerate(r["class_fractions"].items())]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:<{w[2]}}  {d}".rstrip() for a, b, c, d in rows]
    head = ("{checkpoint} (generator step {gen_step}): {n_samples} samples, seed {seed}, vs {n_real} real {data} "
            "{real_split} images at {image_size} x {image_size}").format(**r) + ", averaged generator (EMA)" * bool(raw)
    return "\n".join([head, lines[0], "-" * (sum(w) + 6 + len("notes")), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(EvaluateConfig, sys.argv[1:] if argv is None else argv, prog="wgan_lit.evaluate",
                    doc=__doc__, path_key=("checkpoint", "a checkpoint"),  # metrics.* checked as in training:
                    check=lambda c: cli.problems(declared_rules(c)) + [p for p in [device_problem(c.device)] if p])
    try:
        result = evaluate(cfg)
    except (CheckpointError, ConfigError, DataError, ClassifierError) as err:
        cli.fail(str(err))
    print(json.dumps(result, indent=2) if cfg.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
