"""config.py: group options, defaults in the dataclasses alone, open trainer, one line per bad value, registries."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from tests.conftest import REPO, compose_train
from wgan_lit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, _rules, validate
from wgan_lit.data import DATAMODULES
from wgan_lit.losses import LOSSES
from wgan_lit.metrics import METRICS
from wgan_lit.module import WGAN

CONF, GPU = REPO / "conf", torch.cuda.is_available()


@pytest.mark.parametrize("group,option", [(p.parent.name, p.stem) for p in sorted(CONF.glob("*/*.yaml"))])
def test_every_group_option_composes_and_validates(group, option):
    gpu, no_gpu = option in ("gpu", "ddp"), "^trainer.accelerator='gpu': expected an accelerator this machine has"
    with pytest.raises(ConfigError, match=no_gpu) if gpu and not GPU else contextlib.nullcontext():
        cfg = validate(compose_train([f"{group}={option}"]))
        assert not gpu or L.Trainer(**cfg.trainer).strategy.root_device.type == "cuda"


def test_defaults_are_the_papers_live_in_the_dataclasses_and_yaml_files_state_only_differences():
    m = (cfg := validate(compose_train([]))).model
    assert (m.optimizer, m.lr_g, m.lr_d, m.clip_value, m.n_critic, m.latent_dim) == ("rmsprop", 5e-5, 5e-5, .01, 5, 100)
    assert cfg.model == ModelConfig() and cfg.data == DataConfig()  # the YAML files add nothing to them
    assert dict(WGAN().hparams) == {"image_size": 28, "channels": 1, "log_every_n_gen_steps": 10,
                                    **dataclasses.asdict(ModelConfig())}  # the module takes the same defaults
    gp = validate(compose_train(["model=wgan_gp"])).model  # the penalty's own option is consistent
    assert (gp.gp_weight, gp.clip_value, gp.critic_batchnorm, gp.adam_beta1, gp.adam_beta2) == (10, 0, False, 0, 0.9)
    assert validate(compose_train(["model=gan"])).model.clip_value == 0  # the GAN needs no constraint
    for group in ("model", "data", "logger", "metrics"):
        for path in (CONF / group).glob("*.yaml"):
            for key, value in (OmegaConf.load(path) or {}).items():
                assert key == "defaults" or getattr(getattr(TrainConfig(), group), key) != value, (path, key)
    assert set(OmegaConf.load(CONF / "experiment" / "celeba_64.yaml").model) == {"latent_dim"}  # all it changes
    assert cfg.trainer["devices"] == 1 and "accelerator" not in cfg.trainer  # Lightning's own default: auto
    assert validate(compose_train(["trainer=cpu"])).trainer == {**cfg.trainer, "accelerator": "cpu"}  # inherits


@pytest.mark.parametrize("overrides,value", [
    ("trainer.limit_train_batches=2", 2), ("trainer.fast_dev_run=true", True), ("trainer.profiler=simple", "simple"),
    ("trainer.log_every_n_steps=7", 7), ("+trainer.gradient_clip_val=0.5", 0.5),  # Hydra's append syntax too
    ("trainer.precision=bf16-mixed", "bf16-mixed"), ("trainer.devices=2", 2), ("model.clip_value=0.02", 0.02),
    ("data.batch_size=32", 32), ("model.optimizer=adam model.adam_beta1=0", 0),  # read with Adam: accepted
    ("model.critic=mlp model.mlp_layers=2", 2), ("model.generator=mlp model.n_extra_layers=1", 1),
])
def test_any_trainer_argument_and_every_value_is_accepted_and_reaches_the_config(overrides, value):
    key = overrides.split()[-1].lstrip("+").split("=")[0]
    assert OmegaConf.select(OmegaConf.structured(validate(compose_train(overrides.split()))), key) == value
    assert OmegaConf.select(OmegaConf.structured(validate(compose_train([]))), key) != value  # control


def test_a_dataset_a_loss_and_a_metric_added_from_a_test_file_are_accepted(monkeypatch):
    overrides = ["data.name=toy", "data.split=odd", "data.download=true", "model.loss=hinge",
                 "metrics.checkpoint_monitor=sharpness"]
    with pytest.raises(ConfigError) as err:  # control: unknown before they are added
        validate(compose_train(overrides))
    assert [line.split("=")[0] for line in str(err.value).splitlines()] == [
        "model.loss", "data.name", "metrics.checkpoint_monitor"]
    toy = type("Toy", (DATAMODULES["folder"],), {"name": "toy", "splits": ("odd",), "can_download": True})
    monkeypatch.setitem(DATAMODULES, "toy", toy), monkeypatch.setitem(LOSSES, "hinge", LOSSES["gan"])
    monkeypatch.setitem(METRICS, "sharpness", METRICS["coverage"])
    cfg = validate(compose_train(overrides))
    assert (cfg.data.name, cfg.data.split, cfg.data.download, cfg.model.loss) == ("toy", "odd", True, "hinge")
    monkeypatch.setattr(toy, "splits", ("train",))  # the split is the class's to allow
    with pytest.raises(ConfigError, match="^data.split='odd': expected one of train for data.name=toy$"):
        validate(compose_train(overrides))


def test_ddp_options_find_unused_parameters_and_ddp_takes_every_gpu_and_scales_to_nodes():
    on_cpu = {} if GPU else {"accelerator": "cpu", "devices": 2}  # the same strategy, built without GPUs
    for option in ("ddp", "ddp_cpu"):  # the critic step leaves the generator without gradients: plain DDP fails
        t = L.Trainer(**{**compose_train([f"trainer={option}"]).trainer, **on_cpu})
        assert isinstance(t.strategy, DDPStrategy) and t.strategy._ddp_kwargs.get("find_unused_parameters") is True
    assert (t.num_devices, t.strategy.root_device.type, t.strategy._get_process_group_backend()) == (2, "cpu", "gloo")
    t = compose_train(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]).trainer
    assert (compose_train(["trainer=ddp"]).trainer.devices, t.accelerator, t.devices, t.num_nodes) == (-1, "gpu", 4, 2)


def test_run_dirs_carry_microseconds_the_15min_preset_is_bounded_by_time_and_slurm_composes():
    first, second = (compose_train([], hydra=True).hydra for _ in range(2))  # two sweeps started in one second
    assert first.sweep.dir != second.sweep.dir and first.run.dir != second.run.dir
    assert first.sweep.dir.rsplit("/", 1)[0] == second.sweep.dir.rsplit("/", 1)[0]  # same date folder
    assert OmegaConf.to_container(first.sweep)["subdir"] == "${hydra.job.num}"  # one subdirectory per job
    cfg = validate(compose_train(["experiment=fashion_cpu_15min"]))
    assert cfg.trainer["max_time"] == "00:00:15:00" and cfg.trainer["max_epochs"] == -1 and cfg.max_gen_steps == -1
    trainer = L.Trainer(**{**cfg.trainer, "accelerator": "cpu"}, logger=False, enable_checkpointing=False)
    assert [c._duration for c in trainer.callbacks if isinstance(c, Timer)] == [15 * 60]
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="optional extra: pip install -e .[slurm]")
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.nodes=2",
                         "hydra.launcher.tasks_per_node=4"], hydra=True)
    assert (launcher := cfg.hydra.launcher)._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, cfg.trainer.num_nodes) == (2, 4, 1, 2)


def config(*dotlist: str):  # the schema with dotlist merged in, without Hydra's config loader: fast
    OmegaConf.set_struct((schema := OmegaConf.structured(TrainConfig)).trainer, False)
    return OmegaConf.merge(schema, OmegaConf.from_dotlist(list(dotlist)))


def leaf_keys(node, prefix: str = "") -> list[str]:  # trainer: open, checked against lightning.Trainer (CASES)
    return [k for key, value in node.items() if key != "trainer"
            for k in (leaf_keys(value, f"{prefix}{key}.") if hasattr(value, "items") else [f"{prefix}{key}"])]


PROBE, GP = "fast_path.probe=true", "model.gp_weight=10 model.clip_value=0 model.critic_batchnorm=false"
MLPS = "model.generator=mlp model.critic=mlp"
CASES = [  # "key=wrong value: the start of what its one line says is expected | the other overrides it needs"
    "model.n_critic=0: an integer >= 1", "model.lr_g=0: a number > 0", "model.lr_d=-1: a number > 0",
    "model.clip_value=0: > 0, or model.gp_weight > 0: the Wasserstein critic needs a Lipschitz constraint",
    "model.latent_dim=0: an integer >= 1", "model.g_features=0: an int", "model.d_features=0: an integer >= 1",
    "model.n_fixed_samples=0: an int", "model.optimizer=sgd: one of rmsprop, adam", "model.gp_weight=-1: a number",
    "model.loss=hinge: one of wasserstein, gan", "model.generator=resnet: one of dcgan, mlp",
    f"model.critic_batchnorm=true: false with model.gp_weight > 0: the penalty is per image | {GP}",
    "model.critic=resnet: one of dcgan", "model.n_extra_layers=-1: an integer >= 0", "model.ema_decay=1: a number >=",
    "model.mlp_layers=0: an integer >= 1 | model.generator=mlp", "model.adam_beta2=0.5: its default (0.999)",
    "model.adam_beta1=0.9: its default (0.5): it is read only with model.optimizer=adam",
    "model.mlp_layers=2: its default (4): it is read only with model.generator=mlp or model.critic=mlp",
    f"model.n_extra_layers=1: its default (0): it is read only with model.generator=dcgan or model.c | {MLPS}",
    "data.name=mnist: one of fashion_mnist, celeba, folder", "data.batch_size=0: an int", "data.center_crop=-1: an i",
    "data.image_size=30: one of 16, 28, 32,", "data.num_workers=-1: an integer >= 0", "cpu_threads=-1: an integer >=",
    "data.split=valid: one of train, test for data.name=fashion_mnist", "ckpt_path=/no.ckpt: an existing checkpoint",
    "data.download=true: false: data.name=celeba has no download | data.name=celeba",
    "data.num_workers=2: 0 with data.device_resident=true | data.device_resident=true",
    "logger.name=neptune: one of tensorboard, csv, mlflow, wandb", "logger.log_every_n_gen_steps=0: an integer >= 1",
    "logger.sample_every_n_gen_steps=-1: an int", "max_gen_steps=0: -1 (no limit) or an integer >= 1",
    "checkpoint_every_n_epochs=0: an integer >= 1", "checkpoint_every_n_gen_steps=-1: an integer >= 0",
    "metrics.every_n_gen_steps=-1: an integer >= 0", "metrics.every_n_seconds=-1: a number >= 0",
    "metrics.n_samples=1: an integer >= 2", "metrics.kid_subsets=0: an int", "metrics.kid_subset_size=1: an int",
    "metrics.checkpoint_monitor=fid: one of '', fd_classifier", "fast_path.iters=1: an integer >= 2",
    "fast_path.rounds=0: an integer >= 1", "fast_path.probe=true: false with more than one device | trainer.devices=2",
    f"trainer.precision=32-true: unset with fast_path.probe=true, which chooses it | {PROBE}",
    f"runtime.channels_last=false: unset with fast_path.probe=true | {PROBE}", f"runtime.compile=true: unset | {PROBE}",
    "trainer.limit_trian_batches=2: an argument of lightning.Trainer; did you mean trainer.limit_train_batches?",
    "trainer.callbacks=[]: unset: wgan_lit sets it; use the run's own callbacks",  # no Trainer is built to check
    "trainer.logger=false: unset: wgan_lit sets it; use the logger group (logger=tensorboard, csv, mlflow or wandb)",
    "logger.tracking_uri=sqlite:///x.db: its default (''): it is read only with logger.name=mlflow",
    "logger.online=true: its default (False): it is read only with logger.name=wandb", "objective=coverage: one of",
    "trainer.precision=foo: 64, 32, 16 or 'transformer-engine'", "trainer.max_time=soon: DD:HH:MM:SS",
    "trainer.limit_train_batches=abc: int or float or NoneType (lightning.Trainer's limit_train_batches)",
    "trainer.max_epochs=0: -1 (no limit) or an integer >= 1", "trainer.strategy=dpp: one of auto, ddp,",
    "trainer.accelerator=gpus: one of auto, gpu, cpu, cuda",
]


def test_every_key_is_typed_so_hydra_refuses_a_wrong_type_and_every_ruled_key_has_a_case():
    for key in leaf_keys(cfg := config()):
        with pytest.raises(ValidationError):  # its type is in the schema: Hydra refuses the value as it composes
            OmegaConf.update(cfg, key, [1, 2] if isinstance(OmegaConf.select(cfg, key), str) else "maybe")
    assert {key for key, *_ in _rules(TrainConfig())} <= {case.split("=")[0] for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_every_key_with_a_wrong_value_is_one_line_naming_it_and_what_is_expected(monkeypatch, case):
    refuse = functools.wraps(L.Trainer.__init__)(lambda *_, **__: pytest.fail("a Trainer was built to check"))
    monkeypatch.setattr(L.Trainer, "__init__", refuse)  # wrapped: the rules still read the real signature
    head, _, context = case.partition(" | ")
    (override, expected), key = head.split(": ", 1), head.split("=")[0]
    with pytest.raises(ConfigError) as err:
        validate(cfg := config(*context.split(), override))
    assert str(err.value).startswith(f"{key}={OmegaConf.select(cfg, key)!r}: expected {expected}"), str(err.value)
    assert "\n" not in str(err.value)
    validate(config(*context.split()))  # control: the same without the wrong value is fine
