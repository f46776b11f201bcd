"""Typed schemas of the training config: every default and each value's rule, declared on its field. Hydra checks
types and keys as it composes; :func:`validate` the values. ``trainer`` is open: any ``lightning.Trainer`` argument."""

from __future__ import annotations

import difflib
import importlib.util
import operator
import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wgan_lit.cli import problems

# Sizes the DCGAN pyramids can build: a 4x4 or 7x7 base doubled k times (7 * 2^2 = 28 is Fashion-MNIST).
IMAGE_SIZES = tuple(sorted({b * 2**k for b in (4, 7) for k in range(2, 7)}))
NETWORKS = ("dcgan", "mlp")  # the paper's code: DCGAN, or --mlp_G / --mlp_D
# What a checkpoint's ``wgan_runtime`` records: how the run computed, never hyperparameters (checkpoints from
# before RuntimeConfig hold the last three in ``hyper_parameters``, and loading drops them there).
RUNTIME_KEYS = ("precision", "cpu_threads", "channels_last", "compile", "fused_clamp")


def user_cache_dir() -> Path:
    """``$WGAN_LIT_CACHE``, or ``~/.cache/wgan_lit``: what is built once per user (classifier, fast-path choices)."""
    return Path(os.environ.get("WGAN_LIT_CACHE") or Path.home() / ".cache" / "wgan_lit")


def registry(module: str, name: str) -> Any:
    """``wgan_lit.<module>.<name>``, read when a value is checked: tests extend it, and data.py imports this module."""
    return getattr(importlib.import_module(f"wgan_lit.{module}"), name)


def rule(default: Any, *, ge: float | None = None, gt: float | None = None, lt: float | None = None,
         one_of: Any = None, read_with: dict[str, str] | None = None, note: str = "") -> Any:
    """A field with its rules: bounds; or ``one_of`` a collection (or a function returning one, a registry); and
    ``read_with``, {sibling: value} one of which must hold for the field to be read, else it must keep its default."""
    return field(default=default, metadata=dict(ge=ge, gt=gt, lt=lt, one_of=one_of, read_with=read_with, note=note))


# Where a model key is read: set away from its default elsewhere, it would be accepted and ignored.
ADAM, MLP, DCGAN = {"optimizer": "adam"}, {"generator": "mlp", "critic": "mlp"}, dict(generator="dcgan", critic="dcgan")


def _monitors() -> tuple[str, ...]:
    return ("", *registry("metrics", "METRICS"))  # what checkpoints/best-*.ckpt can be chosen by; "" = none


@dataclass
class ModelConfig:
    latent_dim: int = rule(100, ge=1)  # paper: z ~ N(0, I) of size 100
    g_features: int = rule(64, ge=1)  # width of the generator's last hidden layer (DCGAN's ngf); an MLP's width
    d_features: int = rule(64, ge=1)  # width of the critic's first layer (DCGAN's ndf); an MLP's width
    critic_batchnorm: bool = True  # the paper's DCGAN critic uses BatchNorm
    generator: str = rule("dcgan", one_of=NETWORKS)  # or "mlp" (the paper's --mlp_G)
    critic: str = rule("dcgan", one_of=NETWORKS)  # or "mlp" (--mlp_D)
    g_batchnorm: bool = True  # false: the paper's --noBN generator
    n_extra_layers: int = rule(0, ge=0, read_with=DCGAN)  # 3x3 conv layers added to both DCGAN networks
    mlp_layers: int = rule(4, ge=1, read_with=MLP)  # hidden ReLU layers of an MLP network (the paper's text: 4)
    loss: str = rule("wasserstein", one_of=lambda: registry("losses", "LOSSES"))  # the objective (losses.py)
    optimizer: str = rule("rmsprop", one_of=("rmsprop", "adam"))  # paper: RMSprop, Adam was unstable with clipping
    adam_beta1: float = rule(0.5, read_with=ADAM)  # DCGAN's Adam betas; WGAN-GP uses (0, 0.9) (model=wgan_gp)
    adam_beta2: float = rule(0.999, read_with=ADAM)
    lr_g: float = rule(5e-5, gt=0)  # paper: alpha = 5e-5 for both networks
    lr_d: float = rule(5e-5, gt=0)
    clip_value: float = rule(0.01, ge=0, note=" (0 = no clipping)")  # paper: c = 0.01
    gp_weight: float = rule(0.0, ge=0, note=" (0 = off)")  # gradient penalty lambda (Gulrajani et al. use 10)
    n_critic: int = rule(5, ge=1)  # paper: 5 critic updates per generator update
    paper_critic_schedule: bool = False  # paper's code: 100 critic updates for the first 25 and every 500th
    ema_decay: float = rule(0.0, ge=0, lt=1)  # weight average of the generator samples come from (0 = off; 0.999)
    n_fixed_samples: int = rule(64, ge=1)  # size of the fixed noise batch behind the sample grids
    fixed_noise_seed: int = 1234


@dataclass
class RuntimeConfig:  # how a run computes, not what it learns: checkpoints keep it beside hyperparameters
    fused_clamp: bool = True  # clip all critic weights with two multi-tensor kernels instead of a Python loop
    channels_last: bool = True  # NHWC layout for both networks and the batches: +11% on CPU (docs/speed.md)
    compile: bool = False  # torch.compile both networks (first steps pay the compile time)


@dataclass
class DataConfig:
    name: str = rule("fashion_mnist", one_of=lambda: registry("data", "DATAMODULES"))  # a data.DATAMODULES key
    root: str = "data"  # looked in first; relative paths are relative to the launch directory
    batch_size: int = rule(64, ge=1)  # paper: m = 64; per device under DDP
    image_size: int = rule(28, one_of=IMAGE_SIZES)  # the model's pyramid follows this
    num_workers: int = rule(0, ge=0)  # in-memory datasets need none
    download: bool = False  # fetch through torchvision when no local copy is found
    split: str = "train"  # one of the datamodule class's splits
    cache_dir: str = ""  # celeba/folder: where the decoded uint8 cache goes; "" = <root>/.wgan_cache
    center_crop: int = rule(0, ge=0, note=" (0 = the largest centred square)")  # celeba/folder: cut before resizing
    device_resident: bool = False  # GPU: keep the uint8 images on the device and index batches there


@dataclass
class LoggerConfig:
    name: str = rule("tensorboard", one_of=("tensorboard", "csv", "mlflow", "wandb"))  # conf/logger/*.yaml
    log_every_n_gen_steps: int = rule(10, ge=1)  # scalars, x axis = generator steps
    sample_every_n_gen_steps: int = rule(100, ge=0, note=" (0 = off)")  # image grid of the fixed noise batch
    timelapse: bool = True  # at the end of a run: samples/gen_*.png -> timelapse.gif (+ TensorBoard)
    experiment: str = "wgan_lit"  # MLflow's experiment, W&B's project
    tracking_uri: str = rule("", read_with={"name": "mlflow"})  # "" = sqlite:///<run dir>/mlflow/mlflow.db
    online: bool = rule(False, read_with={"name": "wandb"})  # W&B: sync to its server (else offline run files)


@dataclass
class MetricsConfig:  # sample-quality metrics during training (wgan_lit/metrics.py); conf/metrics/*.yaml
    every_n_gen_steps: int = rule(0, ge=0, note=" (0 = off)")  # every N generator steps, at step 0 and at the end
    every_n_seconds: float = rule(0.0, ge=0, note=" (0 = off)")  # also (or instead) every this many seconds
    n_samples: int = rule(5000, ge=2)  # generated images per evaluation; distances shrink with more: compare equal n
    seed: int = 0  # the same noise every evaluation, so scores of different steps differ only by the model
    classifier_path: str = ""  # "" = $WGAN_LIT_CACHE or ~/.cache/wgan_lit/fmnist_classifier.pt (built once)
    inception: bool = True  # also Inception FID/KID when the weights are on disk (slow on a CPU)
    inception_weights: str = ""  # torch-fidelity's weights file; "" = look in the torch hub cache
    inception_download: bool = False  # true: fetch torch-fidelity's weights once if missing (needs internet)
    inception_url: str = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                          "weights-inception-2015-12-05-6726825d.pth")  # its file name ends in its sha256 prefix
    kid_subsets: int = rule(100, ge=1)  # KID = mean MMD^2 over this many random subsets (torchmetrics' defaults)
    kid_subset_size: int = rule(1000, ge=2)  # capped at n_samples
    checkpoint_monitor: str = rule("fd_classifier", one_of=_monitors)  # keep checkpoints/best-*.ckpt by it; "" = don't


@dataclass
class FastPathConfig:  # the startup probe: precision, threads, layout and compile chosen by timing (fast_path.py)
    probe: bool = False  # true: time each candidate for a few steps at start, train with the fastest (cached)
    iters: int = rule(6, ge=2)  # timed generator iterations per candidate and round
    rounds: int = rule(2, ge=1)  # rounds over all candidates; the median is compared
    compile: bool = True  # also time torch.compile on the fastest (about a minute, once per machine)
    cache: str = ""  # "" = $WGAN_LIT_CACHE or ~/.cache/wgan_lit/fast_path.json (per machine and workload)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # any lightning.Trainer argument, passed on as given
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    max_gen_steps: int = -1  # stop after this many generator updates; -1 = bound by trainer.max_epochs only
    objective: str = rule("fd_classifier", one_of=lambda: [  # the task's return, minimised by hydra/sweeper=optuna
        *(name for name, m in registry("metrics", "METRICS").items() if m.better == "min"),  # its final metrics/<name>
        *(o.short for o in registry("losses", "LOSSES").values())])  # or, metrics off, the loss's final W (or JS)
    checkpoint_every_n_epochs: int = rule(1, ge=1)  # periodic checkpoints; last.ckpt is always kept
    checkpoint_every_n_gen_steps: int = rule(500, ge=0, note=" (0 = off)")  # also rewrite last.ckpt this often
    ckpt_path: str = ""  # resume exactly from this checkpoint (e.g. <run>/checkpoints/last.ckpt)
    cpu_threads: int = rule(0, ge=0, note=" (0 = one per core)")  # torch.set_num_threads; 1 on a shared CPU
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # layout, compile, clamp: not in hyperparameters
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fast_path: FastPathConfig = field(default_factory=FastPathConfig)


class ConfigError(ValueError):
    """A config value that has the right type but is not allowed."""


class DataError(RuntimeError):
    """The data could not be found or read; the message says which file and how to fix it."""


Rule = tuple[str, Any, bool, str]  # (key, value, ok, what is expected): cli.problems formats the failing ones
_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("lt", "<", operator.lt))


def declared_rules(obj: Any, prefix: str = "") -> list[Rule]:
    """The rules declared on the fields of the dataclass ``obj`` (see :func:`rule`), nested ones included."""
    out: list[Rule] = []
    for f in fields(obj):
        key, value, meta = f"{prefix}{f.name}", getattr(obj, f.name), f.metadata
        if is_dataclass(value):
            out += declared_rules(value, f"{key}.")
        elif meta.get("one_of") is not None:
            choices = meta["one_of"]() if callable(meta["one_of"]) else meta["one_of"]
            out.append((key, value, value in choices, f"one of {', '.join(str(c) or repr(c) for c in choices)}"))
        elif bounds := [(sign, meta[name], op) for name, sign, op in _BOUNDS if meta.get(name) is not None]:
            kind = "an integer" if isinstance(value, int) else "a number"
            out.append((key, value, all(op(value, bound) for _, bound, op in bounds),
                        f"{kind} {' and '.join(f'{sign} {bound}' for sign, bound, _ in bounds)}{meta['note']}"))
        if read := meta.get("read_with"):
            out.append((key, value, value == f.default or any(getattr(obj, k) == v for k, v in read.items()),
                        f"its default ({f.default!r}): it is read only with "
                        + " or ".join(f"{prefix}{k}={v}" for k, v in read.items())))
    return out


def _rules(c: TrainConfig) -> list[Rule]:
    """Every value rule: those declared on the fields, then those between fields."""
    m, d, fp = c.model, c.data, c.fast_path
    penalty = m.gp_weight > 0
    dm, objective = registry("data", "DATAMODULES").get(d.name), registry("losses", "LOSSES").get(m.loss)
    probe_sets = (("trainer.precision", c.trainer.get("precision"), None), ("cpu_threads", c.cpu_threads, 0),
                  ("runtime.channels_last", c.runtime.channels_last, RuntimeConfig.channels_last),
                  ("runtime.compile", c.runtime.compile, RuntimeConfig.compile))
    return [
        *declared_rules(c),
        ("logger.name", c.logger.name, c.logger.name not in ("mlflow", "wandb") or importlib.util.find_spec(
            c.logger.name) is not None, f'its library installed: pip install "wgan_lit[{c.logger.name}]"'),
        ("model.clip_value", m.clip_value, not (objective and objective.needs_lipschitz) or m.clip_value or penalty,
         "> 0, or model.gp_weight > 0: the Wasserstein critic needs a Lipschitz constraint (model=wgan_gp)"),
        ("model.critic_batchnorm", m.critic_batchnorm, not (penalty and m.critic_batchnorm and m.critic == "dcgan"),
         "false with model.gp_weight > 0: the penalty is per image, BatchNorm mixes the images of a batch"),
        ("data.split", d.split, dm is None or d.split in dm.splits,
         f"one of {', '.join(dm.splits if dm else ())} for data.name={d.name}"),
        ("data.download", d.download, not d.download or dm is None or dm.can_download,
         f"false: data.name={d.name} has no download (see docs/data.md)"),
        ("data.num_workers", d.num_workers, not (d.device_resident and d.num_workers > 0),
         "0 with data.device_resident=true (worker processes cannot index GPU tensors)"),
        ("max_gen_steps", c.max_gen_steps, c.max_gen_steps == -1 or c.max_gen_steps >= 1,
         "-1 (no limit) or an integer >= 1"),
        ("ckpt_path", c.ckpt_path, c.ckpt_path == "" or Path(c.ckpt_path).is_file(),
         "an existing checkpoint file, e.g. outputs/<date>/<time>/checkpoints/last.ckpt (or empty)"),
        ("fast_path.probe", fp.probe,
         not fp.probe or (c.trainer.get("devices", 1) in (1, "1") and c.trainer.get("num_nodes", 1) == 1),
         "false with more than one device or node: the probe times one process (set the fast path by hand)"),
        *[(key, value, not fp.probe or value == default,
           "unset with fast_path.probe=true, which chooses it (fast_path.probe=false to set it yourself)")
          for key, value, default in probe_sets],
    ]


# Trainer arguments wgan_lit sets itself, and where a user changes what they control.
TRAINER_OWN = {"logger": "the logger group (logger=tensorboard, csv, mlflow or wandb)",
               "callbacks": "the run's own callbacks (wgan_lit/callbacks.py)", "default_root_dir": "hydra.run.dir",
               "plugins": "wgan_lit's checkpoint IO"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` (a YAML scalar or list) is of the type ``hint`` of a lightning.Trainer argument."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if args and origin is not dict:  # Union, Optional
        return any(_fits(value, a) for a in args)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, origin or hint) and not (hint is int and isinstance(value, bool))


def _hint_text(hint: Any) -> str:
    """A type hint for a reader: Literal values as they are written, other types by name."""
    return " or ".join(", ".join(map(repr, typing.get_args(h))) if typing.get_origin(h) is typing.Literal
                       else getattr(h, "__name__", str(h)) for h in typing.get_args(hint) or (hint,))


def _parses_as_duration(value: Any) -> bool:
    from lightning.pytorch.callbacks import Timer

    try:
        Timer(duration=value)  # Lightning's own parser of trainer.max_time
    except Exception:  # noqa: BLE001 - MisconfigurationException, or timedelta's TypeError
        return False
    return True


def trainer_rules(trainer: dict[str, Any]) -> list[Rule]:
    """A rule per ``trainer.*`` key, with no Trainer built: an argument of lightning.Trainer, of its type, and of a
    value Lightning takes (its registries of accelerators and strategies); then, an accelerator this machine has."""
    import lightning as L
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    hints = {k: v for k, v in typing.get_type_hints(L.Trainer.__init__).items() if k != "return"}
    choices = {"accelerator": ("auto", "gpu", *AcceleratorRegistry), "strategy": ("auto", *StrategyRegistry)}
    out: list[Rule] = []
    for key, value in trainer.items():
        name, near = f"trainer.{key}", difflib.get_close_matches(key, hints, n=1)
        if key in TRAINER_OWN:
            out.append((name, value, False, f"unset: wgan_lit sets it; use {TRAINER_OWN[key]}"))
        elif key not in hints:
            out.append((name, value, False, "an argument of lightning.Trainer" + (
                f"; did you mean trainer.{near[0]}?" if near else "")))
        elif not _fits(value, hints[key]):
            out.append((name, value, False, f"{_hint_text(hints[key])} (lightning.Trainer's {key})"))
        elif key in choices:
            out.append((name, value, value in choices[key], f"one of {', '.join(choices[key])}"))
        elif key == "max_epochs":
            out.append((name, value, value in (None, -1) or value >= 1, "-1 (no limit) or an integer >= 1"))
        elif key == "max_time":
            out.append((name, value, _parses_as_duration(value), "DD:HH:MM:SS, e.g. 00:00:15:00"))
    accelerator = {"gpu": "cuda"}.get(trainer.get("accelerator"), trainer.get("accelerator"))
    if accelerator in AcceleratorRegistry:
        device = AcceleratorRegistry[accelerator]["accelerator"]
        out.append(("trainer.accelerator", trainer["accelerator"], device.is_available(), f"an accelerator this "
                    f"machine has, not {device.__name__}: trainer=cpu, or trainer=ddp_cpu for two CPU processes"))
    return out


def validate(cfg: DictConfig) -> TrainConfig:
    """The config as dataclasses, or ConfigError with one ``key=value: expected ...`` line per bad value."""
    # Hydra's callbacks and compose(return_hydra_config=True) carry Hydra's own node; it is not ours to check.
    ours = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), ours))
    except OmegaConfBaseException as err:  # a key that Hydra's "+key=value" added and no dataclass has
        raise ConfigError(f"{err.full_key}: not a key of the training config") from None
    assert isinstance(obj, TrainConfig), type(obj)
    if bad := problems([*_rules(obj), *trainer_rules(obj.trainer)]):
        raise ConfigError("\n".join(bad))
    return obj


def register_configs() -> None:
    schema = OmegaConf.structured(TrainConfig)
    OmegaConf.set_struct(schema.trainer, False)  # open: trainer.ANY_ARGUMENT=VALUE without Hydra's "+"
    ConfigStore.instance().store(name="train_schema", node=schema)
