"""Typed schemas of the training config: the one home of every default, and the checks types cannot express.

Hydra merges ``conf/`` and the command line into these dataclasses, so a wrong *type* (``model.n_critic=abc``)
or an unknown key fails while the config is composed. Wrong *values* (``model.n_critic=0``) fail in
:func:`validate`: for a single run before Hydra creates a run directory (``wgan_lit.cli``), for each job of a
``-m`` sweep as the job starts (``wgan_lit.train``). The YAML files in ``conf/``
state only what differs from the defaults here; ``trainer`` is open: any ``lightning.Trainer`` argument.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from wgan_lit.losses import LOSSES

# Sizes the DCGAN pyramids can build: a 4x4 or 7x7 base doubled k times (7 * 2^2 = 28 is Fashion-MNIST).
IMAGE_SIZES = tuple(sorted({b * 2**k for b in (4, 7) for k in range(2, 7)}))
DATASETS = ("fashion_mnist", "celeba", "folder")
DATA_SPLITS = {"fashion_mnist": ("train", "test"), "celeba": ("train", "valid", "test", "all"),
               "folder": ("train", "all")}  # a folder has no splits: both mean every image
OPTIMIZERS = ("rmsprop", "adam")
NETWORKS = ("dcgan", "mlp")  # the paper's code: DCGAN, or --mlp_G / --mlp_D
LOGGERS = ("tensorboard", "csv")
# Sample-quality metrics a best checkpoint can be chosen by, and which way is better (wgan_lit/metrics.py).
SAMPLE_METRICS = {"fd_classifier": "min", "kid": "min", "coverage": "max", "fid_inception": "min",
                  "kid_inception": "min"}


def user_cache_dir() -> Path:
    """``$WGAN_LIT_CACHE``, or ``~/.cache/wgan_lit``: where what is built once per user is kept (the metrics'
    classifier, the fast-path choices), unless a config key names another file."""
    return Path(os.environ.get("WGAN_LIT_CACHE") or Path.home() / ".cache" / "wgan_lit")


@dataclass
class ModelConfig:
    latent_dim: int = 100  # paper: z ~ N(0, I) of size 100
    g_features: int = 64  # width of the generator's last hidden layer (DCGAN's ngf); an MLP's hidden width
    d_features: int = 64  # width of the critic's first layer (DCGAN's ndf); an MLP's hidden width
    critic_batchnorm: bool = True  # the paper's DCGAN critic uses BatchNorm
    generator: str = "dcgan"  # or "mlp" (the paper's --mlp_G)
    critic: str = "dcgan"  # or "mlp" (--mlp_D)
    g_batchnorm: bool = True  # false: the paper's --noBN generator
    n_extra_layers: int = 0  # 3x3 conv layers added to both DCGAN networks (--n_extra_layers)
    mlp_layers: int = 4  # hidden ReLU layers of an MLP network; its width is g_features / d_features (512 in
    # the paper's MLP runs, 4 hidden layers in its text; its code builds 3)
    # "wasserstein": the critic estimates W (the paper). "gan": the standard GAN baseline, a sigmoid
    # discriminator with the non-saturating generator loss (conf/model/gan.yaml).
    loss: str = "wasserstein"
    optimizer: str = "rmsprop"  # paper: RMSprop, since momentum-based Adam was unstable with clipping
    adam_beta1: float = 0.5  # DCGAN's Adam betas; WGAN-GP uses (0, 0.9) (conf/model/wgan_gp.yaml)
    adam_beta2: float = 0.999
    lr_g: float = 5e-5  # paper: alpha = 5e-5 for both networks
    lr_d: float = 5e-5
    clip_value: float = 0.01  # paper: c = 0.01; 0 = no clipping
    gp_weight: float = 0.0  # gradient penalty lambda (Gulrajani et al. 2017 use 10); 0 = off
    n_critic: int = 5  # paper: 5 critic updates per generator update
    paper_critic_schedule: bool = False  # paper's code: 100 critic updates for the first 25 and every 500th
    # Exponential moving average of the generator's weights (0 = off, 0.999 is usual). When on, it is the
    # generator of the sample grids, the metrics, generate and evaluate; the critic trains against the raw one.
    ema_decay: float = 0.0
    n_fixed_samples: int = 64  # size of the fixed noise batch behind the sample grids
    fixed_noise_seed: int = 1234


@dataclass
class RuntimeConfig:
    """How a run computes, not what it learns (measured by benchmarks/throughput.py; see docs/speed.md).

    Not hyperparameters: a checkpoint keeps them beside its ``hyper_parameters`` (``wgan_runtime``, with
    ``trainer.precision`` and ``cpu_threads``), so another machine can load it with its own."""

    fused_clamp: bool = True  # clip all critic weights with two multi-tensor kernels instead of a Python loop
    channels_last: bool = True  # NHWC layout for both networks and the batches: +11% on CPU, measured
    compile: bool = False  # torch.compile both networks (first steps pay the compile time)


# What a checkpoint's ``wgan_runtime`` records: how the run computed. Never hyperparameters; checkpoints written
# before RuntimeConfig hold the last three in ``hyper_parameters``, and loading drops them there.
RUNTIME_KEYS = ("precision", "cpu_threads", "channels_last", "compile", "fused_clamp")


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: str = "data"  # looked in first; relative paths are relative to the launch directory
    batch_size: int = 64  # paper: m = 64; per device under DDP
    image_size: int = 28  # the model's pyramid follows this
    num_workers: int = 0  # in-memory datasets need none
    download: bool = False  # fetch through torchvision when no local copy is found
    split: str = "train"
    cache_dir: str = ""  # celeba/folder: where the decoded uint8 cache goes; "" = <root>/.wgan_cache
    center_crop: int = 0  # celeba/folder: centred square cut before resizing; 0 = the largest (short side)
    device_resident: bool = False  # GPU: keep the uint8 images on the device and index batches there


@dataclass
class LoggerConfig:
    name: str = "tensorboard"
    log_every_n_gen_steps: int = 10  # scalars, x axis = generator steps
    sample_every_n_gen_steps: int = 100  # image grid of the fixed noise batch; 0 turns it off
    timelapse: bool = True  # at the end of a run: samples/gen_*.png -> timelapse.gif (+ TensorBoard)


@dataclass
class MetricsConfig:
    """Sample-quality metrics during training (wgan_lit/metrics.py); conf/metrics/*.yaml."""

    every_n_gen_steps: int = 0  # 0 = off; else every N generator steps, at step 0 and at the end
    every_n_seconds: float = 0.0  # also (or instead) every this many seconds of training; 0 = off
    n_samples: int = 5000  # generated images per evaluation; distances shrink with more, so compare equal n
    seed: int = 0  # the same noise every evaluation, so scores of different steps differ only by the model
    classifier_path: str = ""  # "" = $WGAN_LIT_CACHE or ~/.cache/wgan_lit/fmnist_classifier.pt (built once)
    inception: bool = True  # also Inception FID/KID when the weights are on disk (slow on a CPU)
    inception_weights: str = ""  # torch-fidelity's weights file; "" = look in the torch hub cache
    # true: fetch torch-fidelity's weights into the torch hub cache once, when they are not there (needs internet)
    inception_download: bool = False
    inception_url: str = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                          "weights-inception-2015-12-05-6726825d.pth")  # its file name ends in its sha256 prefix
    kid_subsets: int = 100  # KID = mean MMD^2 over this many random subsets (torchmetrics' defaults)
    kid_subset_size: int = 1000  # capped at n_samples
    checkpoint_monitor: str = "fd_classifier"  # keep checkpoints/best-*.ckpt by this metric; "" = don't


@dataclass
class FastPathConfig:
    """The startup probe that picks precision, threads, memory layout and compile by timing (fast_path.py)."""

    probe: bool = False  # true: time each candidate for a few steps at start, train with the fastest (cached)
    iters: int = 6  # timed generator iterations per candidate and round
    rounds: int = 2  # rounds over all candidates; the median is compared
    compile: bool = True  # also time torch.compile on the fastest (about a minute, once per machine)
    cache: str = ""  # "" = $WGAN_LIT_CACHE or ~/.cache/wgan_lit/fast_path.json (per machine and workload)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # Any lightning.Trainer argument, passed on as given; conf/trainer/*.yaml set only what differs from
    # Lightning's defaults. Checked against Trainer's signature and by building a Trainer (check_trainer).
    trainer: dict[str, Any] = field(default_factory=dict)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    max_gen_steps: int = -1  # stop after this many generator updates; -1 = bound by trainer.max_epochs only
    checkpoint_every_n_epochs: int = 1  # periodic checkpoints; last.ckpt is always kept
    checkpoint_every_n_gen_steps: int = 500  # also rewrite last.ckpt this often (crash safety); 0 = off
    ckpt_path: str = ""  # resume exactly from this checkpoint (e.g. <run>/checkpoints/last.ckpt)
    # torch.set_num_threads; 0 = torch's default (one per core); 1 on a CPU shared with other jobs (docs/speed.md)
    cpu_threads: int = 0
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # layout, compile, clamp: not in hyperparameters
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    fast_path: FastPathConfig = field(default_factory=FastPathConfig)


class ConfigError(ValueError):
    """A config value that has the right type but is not allowed."""


class DataError(RuntimeError):
    """The data could not be found or read; the message says which file and how to fix it."""


def _rules(c: TrainConfig) -> list[tuple[str, Any, bool, str]]:
    """(key, value, ok, what is expected) for every value-level constraint."""
    m, d, lg = c.model, c.data, c.logger
    return [
        ("model.n_critic", m.n_critic, m.n_critic >= 1, "an integer >= 1 (the paper uses 5)"),
        ("model.clip_value", m.clip_value, m.clip_value >= 0, "a number >= 0 (the paper uses 0.01; 0 = off)"),
        ("model.gp_weight", m.gp_weight, m.gp_weight >= 0, "a number >= 0 (Gulrajani et al. use 10; 0 = off)"),
        ("model.clip_value", m.clip_value,
         m.loss not in LOSSES or not LOSSES[m.loss].needs_lipschitz or m.clip_value != 0 or m.gp_weight > 0,
         "> 0, or model.gp_weight > 0: the Wasserstein critic needs a Lipschitz constraint (model=wgan_gp)"),
        ("model.critic_batchnorm", m.critic_batchnorm,
         not (m.gp_weight > 0 and m.critic_batchnorm and m.critic == "dcgan"),
         "false with model.gp_weight > 0: the penalty is per image, BatchNorm mixes the images of a batch"),
        ("model.loss", m.loss, m.loss in LOSSES, f"one of {', '.join(LOSSES)}"),
        ("model.generator", m.generator, m.generator in NETWORKS, f"one of {', '.join(NETWORKS)}"),
        ("model.critic", m.critic, m.critic in NETWORKS, f"one of {', '.join(NETWORKS)}"),
        ("model.n_extra_layers", m.n_extra_layers, m.n_extra_layers >= 0, "an integer >= 0"),
        ("model.mlp_layers", m.mlp_layers, m.mlp_layers >= 1, "an integer >= 1 (the paper uses 4)"),
        ("model.ema_decay", m.ema_decay, 0 <= m.ema_decay < 1, "0 (off) or a number in (0, 1), e.g. 0.999"),
        *_unused_rules(m),
        ("model.lr_g", m.lr_g, m.lr_g > 0, "a number > 0 (the paper uses 5e-5)"),
        ("model.lr_d", m.lr_d, m.lr_d > 0, "a number > 0 (the paper uses 5e-5)"),
        ("model.latent_dim", m.latent_dim, m.latent_dim >= 1, "an integer >= 1 (the paper uses 100)"),
        ("model.g_features", m.g_features, m.g_features >= 1, "an integer >= 1 (DCGAN uses 64)"),
        ("model.d_features", m.d_features, m.d_features >= 1, "an integer >= 1 (DCGAN uses 64)"),
        ("model.optimizer", m.optimizer, m.optimizer in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
        ("model.n_fixed_samples", m.n_fixed_samples, m.n_fixed_samples >= 1, "an integer >= 1"),
        ("data.name", d.name, d.name in DATASETS, f"one of {', '.join(DATASETS)}"),
        ("data.batch_size", d.batch_size, d.batch_size >= 1, "an integer >= 1 (the paper uses 64)"),
        ("data.image_size", d.image_size, d.image_size in IMAGE_SIZES, f"one of {IMAGE_SIZES}"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, "an integer >= 0"),
        ("data.split", d.split, d.split in DATA_SPLITS.get(d.name, (d.split,)),
         f"one of {', '.join(DATA_SPLITS.get(d.name, ()))} for data.name={d.name}"),
        ("data.center_crop", d.center_crop, d.center_crop >= 0,
         "0 (the largest centred square) or a side in pixels"),
        ("data.download", d.download, not d.download or d.name == "fashion_mnist",
         "false: only fashion_mnist downloads; CelebA is fetched by hand (see docs/data.md)"),
        ("data.num_workers", d.num_workers, not (d.device_resident and d.num_workers > 0),
         "0 with data.device_resident=true (worker processes cannot index GPU tensors)"),
        ("logger.name", lg.name, lg.name in LOGGERS, f"one of {', '.join(LOGGERS)}"),
        ("logger.log_every_n_gen_steps", lg.log_every_n_gen_steps, lg.log_every_n_gen_steps >= 1,
         "an integer >= 1"),
        ("logger.sample_every_n_gen_steps", lg.sample_every_n_gen_steps, lg.sample_every_n_gen_steps >= 0,
         "an integer >= 0 (0 turns sample grids off)"),
        ("max_gen_steps", c.max_gen_steps, c.max_gen_steps == -1 or c.max_gen_steps >= 1,
         "-1 (no limit) or an integer >= 1"),
        ("checkpoint_every_n_epochs", c.checkpoint_every_n_epochs, c.checkpoint_every_n_epochs >= 1,
         "an integer >= 1"),
        ("checkpoint_every_n_gen_steps", c.checkpoint_every_n_gen_steps, c.checkpoint_every_n_gen_steps >= 0,
         "an integer >= 0 (0 turns the mid-epoch last.ckpt off)"),
        ("ckpt_path", c.ckpt_path, c.ckpt_path == "" or Path(c.ckpt_path).is_file(),
         "an existing checkpoint file, e.g. outputs/<date>/<time>/checkpoints/last.ckpt (or empty)"),
        ("cpu_threads", c.cpu_threads, c.cpu_threads >= 0, "an integer >= 0 (0 = one thread per core)"),
        *metrics_rules(c.metrics),
        ("fast_path.iters", c.fast_path.iters, c.fast_path.iters >= 2, "an integer >= 2"),
        ("fast_path.rounds", c.fast_path.rounds, c.fast_path.rounds >= 1, "an integer >= 1"),
        ("fast_path.probe", c.fast_path.probe,
         not c.fast_path.probe or (c.trainer.get("devices", 1) in (1, "1") and c.trainer.get("num_nodes", 1) == 1),
         "false with more than one device or node: the probe times one process (set the fast path by hand)"),
        *[(key, value, not c.fast_path.probe or value == default,
           "unset with fast_path.probe=true, which chooses it (fast_path.probe=false to set it yourself)")
          for key, value, default in (("trainer.precision", c.trainer.get("precision"), None),
                                      ("cpu_threads", c.cpu_threads, 0),
                                      ("runtime.channels_last", c.runtime.channels_last,
                                       RuntimeConfig.channels_last),
                                      ("runtime.compile", c.runtime.compile, RuntimeConfig.compile))],
    ]


def _unused_rules(m: ModelConfig) -> list[tuple[str, Any, bool, str]]:
    """A key set away from its default where nothing reads it would be accepted and ignored: refuse it."""
    d = ModelConfig()
    mlp = "mlp" in (m.generator, m.critic)
    dcgan = "dcgan" in (m.generator, m.critic)
    unused = [
        ("adam_beta1", m.optimizer == "adam", "model.optimizer=adam"),
        ("adam_beta2", m.optimizer == "adam", "model.optimizer=adam"),
        ("mlp_layers", mlp, "model.generator=mlp or model.critic=mlp"),
        ("n_extra_layers", dcgan, "a DCGAN network (model.generator or model.critic = dcgan)"),
    ]
    return [(f"model.{key}", getattr(m, key), used or getattr(m, key) == getattr(d, key),
             f"its default ({getattr(d, key)!r}): it is read only with {where}") for key, used, where in unused]


def metrics_rules(mc: MetricsConfig) -> list[tuple[str, Any, bool, str]]:
    return [
        ("metrics.every_n_gen_steps", mc.every_n_gen_steps, mc.every_n_gen_steps >= 0,
         "an integer >= 0 (0 turns the sample-quality metrics off)"),
        ("metrics.every_n_seconds", mc.every_n_seconds, mc.every_n_seconds >= 0,
         "a number >= 0 (0 turns the time-based schedule off)"),
        ("metrics.n_samples", mc.n_samples, mc.n_samples >= 2, "an integer >= 2 (5000 is usual)"),
        ("metrics.kid_subsets", mc.kid_subsets, mc.kid_subsets >= 1, "an integer >= 1"),
        ("metrics.kid_subset_size", mc.kid_subset_size, mc.kid_subset_size >= 2,
         "an integer >= 2 (capped at metrics.n_samples)"),
        ("metrics.checkpoint_monitor", mc.checkpoint_monitor, mc.checkpoint_monitor in ("", *SAMPLE_METRICS),
         f"'' (none) or one of {', '.join(SAMPLE_METRICS)}"),
    ]


# Trainer arguments wgan_lit sets itself, and where a user changes what they control.
TRAINER_OWN = {
    "logger": "the logger group (logger=tensorboard or logger=csv)",
    "callbacks": "the run's own callbacks (wgan_lit/callbacks.py)",
    "default_root_dir": "hydra.run.dir",
    "plugins": "wgan_lit's checkpoint IO",
}


def check_trainer(trainer: dict[str, Any]) -> list[str]:
    """One line per ``trainer.*`` key that lightning.Trainer would not take, or [] when it builds."""
    import lightning as L
    import torch

    known = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    bad = []
    for key in trainer:
        if key in TRAINER_OWN:
            bad.append(f"trainer.{key}: set by wgan_lit; use {TRAINER_OWN[key]}")
        elif key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean trainer.{near[0]}?" if near else ""
            bad.append(f"trainer.{key}: not an argument of lightning.Trainer{hint}")
    if bad:
        return bad
    if str(trainer.get("accelerator", "")) in ("gpu", "cuda") and not torch.cuda.is_available():
        return [f"trainer.accelerator={trainer['accelerator']}: no GPU is visible (torch.cuda.is_available() is "
                "False); use trainer=cpu, or trainer=ddp_cpu for two CPU processes"]
    # Lightning checks the values itself when a Trainer is built; building one writes nothing.
    error = _trainer_error(trainer)
    if error is None:
        return []
    # Name the argument: the first one whose addition makes Lightning refuse.
    culprit = next((k for i, k in enumerate(trainer) if _trainer_error(dict(list(trainer.items())[: i + 1]))),
                   None)
    what = f"trainer.{culprit}={trainer[culprit]!r}" if culprit else "trainer"
    return [f"{what}: lightning.Trainer refused it: {error}"]


def _trainer_error(kwargs: dict[str, Any]) -> str | None:
    import lightning as L

    quiet = logging.getLogger("lightning.pytorch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # setLevel, not .level: it clears logging's cache of enabled levels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.Trainer(**kwargs, logger=False)
    except Exception as err:  # noqa: BLE001 - Lightning raises ValueError, TypeError, MisconfigurationException
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    finally:
        quiet.setLevel(level)
    return None


def validate(cfg: DictConfig) -> TrainConfig:
    """Return the config as dataclasses, or raise ConfigError with one line per bad value."""
    # Hydra's callbacks and compose(return_hydra_config=True) carry Hydra's own node; it is not ours to check.
    ours = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), ours))
    assert isinstance(obj, TrainConfig), type(obj)
    bad = [f"{key}={value!r}: expected {expected}" for key, value, ok, expected in _rules(obj) if not ok]
    max_epochs = obj.trainer.get("max_epochs")
    if not (max_epochs is None or isinstance(max_epochs, int) and (max_epochs == -1 or max_epochs >= 1)):
        bad.append(f"trainer.max_epochs={max_epochs!r}: expected -1 (no limit) or an integer >= 1")
    bad += check_trainer(obj.trainer)
    if bad:
        raise ConfigError("\n".join(bad))
    return obj


def register_configs() -> None:
    schema = OmegaConf.structured(TrainConfig)
    # Open: trainer.ANY_ARGUMENT=VALUE is accepted without Hydra's "+" (check_trainer names a wrong one).
    OmegaConf.set_struct(schema.trainer, False)
    ConfigStore.instance().store(name="train_schema", node=schema)
