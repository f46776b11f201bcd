"""Typed schemas for the Hydra configs in ``conf/`` and the checks Hydra's types cannot express.

Hydra merges every YAML file and command-line override into these dataclasses, so a wrong *type*
(``model.n_critic=abc``) or an unknown key fails while the config is composed. Wrong *values*
(``model.n_critic=0``) are caught by :func:`validate`, which :class:`ValidateConfig` runs before Hydra
creates the run directory, so a bad command line never leaves files behind.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# Sizes the DCGAN pyramids can build: a 4x4 or 7x7 base doubled k times (7 * 2^2 = 28 is Fashion-MNIST).
IMAGE_SIZES = tuple(sorted({b * 2**k for b in (4, 7) for k in range(2, 7)}))
DATASETS = ("fashion_mnist", "celeba", "folder")
DATA_SPLITS = {"fashion_mnist": ("train", "test"), "celeba": ("train", "valid", "test", "all"),
               "folder": ("train", "all")}  # a folder has no splits: both mean every image
OPTIMIZERS = ("rmsprop", "adam")
LOGGERS = ("tensorboard", "csv")
# Sample-quality metrics a best checkpoint can be chosen by, and which way is better (wgan_lit/metrics.py).
SAMPLE_METRICS = {"fd_classifier": "min", "kid": "min", "coverage": "max", "fid_inception": "min",
                  "kid_inception": "min"}


@dataclass
class ModelConfig:
    latent_dim: int = 100  # paper: z ~ N(0, I) of size 100
    g_features: int = 64  # width of the generator's last hidden layer (DCGAN's ngf)
    d_features: int = 64  # width of the critic's first layer (DCGAN's ndf)
    critic_batchnorm: bool = True  # the paper's DCGAN critic uses BatchNorm
    optimizer: str = "rmsprop"  # paper: RMSprop, since momentum-based Adam was unstable with clipping
    lr_g: float = 5e-5  # paper: alpha = 5e-5 for both networks
    lr_d: float = 5e-5
    clip_value: float = 0.01  # paper: c = 0.01
    n_critic: int = 5  # paper: 5 critic updates per generator update
    paper_critic_schedule: bool = False  # paper's code: 100 critic updates for the first 25 and every 500th
    n_fixed_samples: int = 64  # size of the fixed noise batch behind the sample grids
    fixed_noise_seed: int = 1234
    # Fast-path switches (measured by benchmarks/throughput.py; see README "Speed").
    fused_clamp: bool = True  # clip all critic weights with two multi-tensor kernels instead of a Python loop
    channels_last: bool = True  # NHWC layout for both networks and the batches: +11% on CPU, measured
    compile: bool = False  # torch.compile both networks (first steps pay the compile time)


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
class TrainerConfig:
    """Keyword arguments of ``lightning.Trainer``; ``conf/trainer/*.yaml`` override a few each."""

    accelerator: str = "auto"
    devices: Any = 1  # trainer=ddp for all GPUs (plain "auto" would pick DDP without find_unused_parameters)
    strategy: str = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_epochs: int = 5  # one bound on a run's length; see also max_gen_steps
    deterministic: bool = False
    enable_progress_bar: bool = True
    max_time: str | None = None  # wall-clock bound "DD:HH:MM:SS", e.g. "00:00:15:00"; null = none


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
    n_samples: int = 5000  # generated images per evaluation; distances shrink with more, so compare equal n
    seed: int = 0  # the same noise every evaluation, so scores of different steps differ only by the model
    classifier_path: str = ""  # "" = $WGAN_LIT_CACHE or ~/.cache/wgan_lit/fmnist_classifier.pt (built once)
    inception: bool = True  # also Inception FID/KID when the weights are on disk (slow on a CPU)
    inception_weights: str = ""  # torch-fidelity's weights file; "" = look in the torch hub cache
    kid_subsets: int = 100  # KID = mean MMD^2 over this many random subsets (torchmetrics' defaults)
    kid_subset_size: int = 1000  # capped at n_samples
    checkpoint_monitor: str = "fd_classifier"  # keep checkpoints/best-*.ckpt by this metric; "" = don't


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    max_gen_steps: int = -1  # stop after this many generator updates; -1 = bound by trainer.max_epochs only
    checkpoint_every_n_epochs: int = 1  # periodic checkpoints; last.ckpt is always kept
    checkpoint_every_n_gen_steps: int = 500  # also rewrite last.ckpt this often (crash safety); 0 = off
    ckpt_path: str = ""  # resume exactly from this checkpoint (e.g. <run>/checkpoints/last.ckpt)
    # torch.set_num_threads; 0 = torch's default (one per core). On a CPU shared with other jobs, 1 avoids
    # OpenMP threads spin-waiting for a core (measured up to 10x slower with 2 threads; README "Speed").
    cpu_threads: int = 0
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


class ConfigError(ValueError):
    """A config value that has the right type but is not allowed."""


def _rules(c: TrainConfig) -> list[tuple[str, Any, bool, str]]:
    """(key, value, ok, what is expected) for every value-level constraint."""
    m, d, lg = c.model, c.data, c.logger
    return [
        ("model.n_critic", m.n_critic, m.n_critic >= 1, "an integer >= 1 (the paper uses 5)"),
        ("model.clip_value", m.clip_value, m.clip_value > 0, "a number > 0 (the paper uses 0.01)"),
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
         "false: only fashion_mnist downloads; CelebA is fetched by hand (see the README)"),
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
        ("trainer.max_epochs", c.trainer.max_epochs, c.trainer.max_epochs == -1 or c.trainer.max_epochs >= 1,
         "-1 (no limit) or an integer >= 1"),
        *_metrics_rules(c.metrics),
    ]


def _metrics_rules(mc: MetricsConfig) -> list[tuple[str, Any, bool, str]]:
    return [
        ("metrics.every_n_gen_steps", mc.every_n_gen_steps, mc.every_n_gen_steps >= 0,
         "an integer >= 0 (0 turns the sample-quality metrics off)"),
        ("metrics.n_samples", mc.n_samples, mc.n_samples >= 2, "an integer >= 2 (5000 is usual)"),
        ("metrics.kid_subsets", mc.kid_subsets, mc.kid_subsets >= 1, "an integer >= 1"),
        ("metrics.kid_subset_size", mc.kid_subset_size, mc.kid_subset_size >= 2,
         "an integer >= 2 (capped at metrics.n_samples)"),
        ("metrics.checkpoint_monitor", mc.checkpoint_monitor, mc.checkpoint_monitor in ("", *SAMPLE_METRICS),
         f"'' (none) or one of {', '.join(SAMPLE_METRICS)}"),
    ]


def validate(cfg: DictConfig) -> TrainConfig:
    """Return the config as dataclasses, or raise ConfigError listing every bad value."""
    # Hydra's callbacks see Hydra's own node too; it is not ours to check.
    ours = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), ours))
    assert isinstance(obj, TrainConfig), type(obj)
    bad = [f"  {key}={value!r}: expected {expected}" for key, value, ok, expected in _rules(obj) if not ok]
    if bad:
        raise ConfigError(
            "Invalid config value(s):\n" + "\n".join(bad) + "\nFix the override(s) on the command line "
            "(e.g. model.n_critic=5) or in the YAML under conf/."
        )
    return obj


class ValidateConfig(Callback):
    """Hydra callback: reject bad values before Hydra writes the run or sweep directory."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_invalid(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Compose every job of the sweep up front, so a bad value in job 3 stops the sweep before job 1 runs.
        from hydra import compose
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException

        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            return  # other sweepers choose values as they go; on_job_start checks each job
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        for batch in BasicSweeper.split_arguments(overrides, max_batch_size=None):
            for job_overrides in batch:
                try:
                    job = compose(config_name=config.hydra.job.config_name, overrides=job_overrides)
                except HydraException as err:
                    print(f"Error in sweep job {' '.join(job_overrides)}:\n{err}", file=sys.stderr)
                    sys.exit(2)
                _exit_if_invalid(job)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        _exit_if_invalid(config)  # sweepers that pick values as they go


def _exit_if_invalid(config: DictConfig) -> None:
    try:
        validate(config)
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
