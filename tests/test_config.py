"""config.py: every group option composes; defaults live in the dataclasses alone; the trainer group takes any
lightning.Trainer argument; bad values fail with one line naming the key before anything is written."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf

from tests.conftest import REPO, compose_train, run_cli
from wgan_lit.config import ConfigError, DataConfig, ModelConfig, TrainConfig, check_trainer, validate
from wgan_lit.module import WGAN

CONF = REPO / "conf"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "data", "trainer", "logger", "metrics")
                                          for o in options(g)] + [("experiment", o) for o in options("experiment")])
def test_every_group_option_composes_and_validates(group, option):
    if option in ("gpu", "ddp") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.accelerator=gpu: no GPU is visible.*trainer=cpu"):
            validate(compose_train([f"{group}={option}"]))
        return
    assert isinstance(validate(compose_train([f"{group}={option}"])), TrainConfig)


def test_defaults_are_the_papers_and_live_in_the_dataclasses():
    cfg = validate(compose_train([]))
    m = cfg.model
    paper = ("rmsprop", 5e-5, 5e-5, 0.01, 5, 100)
    assert (m.optimizer, m.lr_g, m.lr_d, m.clip_value, m.n_critic, m.latent_dim) == paper
    assert cfg.model == ModelConfig() and cfg.data == DataConfig()  # the YAML files add nothing to them
    assert dict(WGAN().hparams) == {"image_size": 28, "channels": 1, "log_every_n_gen_steps": 10,
                                    **dataclasses.asdict(ModelConfig())}  # the module takes the same defaults


def test_yaml_files_state_only_what_differs_from_the_dataclass_defaults():
    defaults = OmegaConf.structured(TrainConfig)
    for group, schema in (("model", "model"), ("data", "data"), ("logger", "logger"), ("metrics", "metrics")):
        for path in (CONF / group).glob("*.yaml"):
            own = OmegaConf.load(path) or {}
            for key, value in own.items():
                if key != "defaults":
                    assert defaults[schema][key] != value, f"{path.name} repeats the default {key}={value}"
    preset = OmegaConf.load(CONF / "experiment" / "celeba_64.yaml")
    assert set(preset.model) == {"latent_dim"}  # the one model setting it changes


def test_trainer_options_inherit_the_default_and_the_default_is_one_device():
    default, cpu = validate(compose_train([])).trainer, validate(compose_train(["trainer=cpu"])).trainer
    assert default["devices"] == 1 and "accelerator" not in default  # Lightning's own default: auto
    assert cpu == {**default, "accelerator": "cpu"}


@pytest.mark.parametrize("override,key,value", [
    ("trainer.limit_train_batches=2", "limit_train_batches", 2),
    ("trainer.fast_dev_run=true", "fast_dev_run", True),
    ("trainer.profiler=simple", "profiler", "simple"),
    ("trainer.log_every_n_steps=7", "log_every_n_steps", 7),
    ("+trainer.gradient_clip_val=0.5", "gradient_clip_val", 0.5),  # Hydra's append syntax works too
])
def test_any_trainer_argument_is_accepted_and_reaches_the_trainer(override, key, value):
    cfg = validate(compose_train(["trainer=cpu", override]))
    assert cfg.trainer[key] == value
    assert key not in validate(compose_train(["trainer=cpu"])).trainer or key == "log_every_n_steps"  # control


@pytest.mark.parametrize("override,message", [
    ("trainer.limit_trian_batches=2", "trainer.limit_trian_batches: not an argument of lightning.Trainer; did you "
                                      "mean trainer.limit_train_batches?"),
    ("trainer.callbacks=[]", "trainer.callbacks: set by wgan_lit"),
    ("trainer.precision=foo", "trainer.precision='foo': lightning.Trainer refused it: Precision 'foo' is invalid"),
    ("trainer.max_time=soon", "trainer.max_time='soon': lightning.Trainer refused it"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0: expected -1 (no limit) or an integer >= 1"),
])
def test_a_bad_trainer_argument_is_one_line_naming_it(override, message):
    with pytest.raises(ConfigError) as err:
        validate(compose_train(["trainer=cpu", override]))
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_check_trainer_passes_good_arguments_and_names_each_bad_one():
    assert check_trainer({"accelerator": "cpu", "limit_train_batches": 3}) == []
    assert check_trainer({"accelerator": "cpu", "nope": 1, "logger": False}) == [
        "trainer.nope: not an argument of lightning.Trainer",
        "trainer.logger: set by wgan_lit; use the logger group (logger=tensorboard or logger=csv)"]


def test_every_value_is_overridable():
    cfg = validate(compose_train(["model.clip_value=0.02", "model.n_critic=3", "data.batch_size=32", "trainer=cpu",
                                  "max_gen_steps=7", "logger.sample_every_n_gen_steps=0"]))
    assert (cfg.model.clip_value, cfg.model.n_critic, cfg.data.batch_size, cfg.max_gen_steps) == (0.02, 3, 32, 7)


@pytest.mark.parametrize("override,key", [("model.n_critic=abc", "model.n_critic"),
                                          ("model.clip_value=big", "model.clip_value"),
                                          ("model.nope=1", "model.nope")])
def test_wrong_types_and_unknown_keys_fail_at_compose_time(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_train([override])
    assert key in str(err.value) or key in str(err.value.__cause__)


@pytest.mark.parametrize("override,key", [
    ("model.n_critic=0", "model.n_critic=0"), ("model.clip_value=-1", "model.clip_value=-1.0"),
    ("model.lr_d=0", "model.lr_d=0.0"), ("data.batch_size=0", "data.batch_size=0"),
    ("data.image_size=30", "data.image_size=30"), ("model.optimizer=sgd", "model.optimizer='sgd'"),
    ("max_gen_steps=0", "max_gen_steps=0"), ("cpu_threads=-1", "cpu_threads=-1"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, key):
    with pytest.raises(ConfigError, match="expected") as err:
        validate(compose_train([override]))
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("override,used_with", [
    ("model.adam_beta1=0", "model.optimizer=adam"), ("model.mlp_layers=2", "model.critic=mlp"),
    ("model.n_extra_layers=1", None),
])
def test_a_key_nothing_reads_is_refused_and_accepted_where_it_is_read(override, used_with):
    only_mlp = ["model.generator=mlp", "model.critic=mlp"] if used_with is None else []
    with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}=.*it is read only with"):
        validate(compose_train([*only_mlp, override]))
    if used_with:  # control: where the key is read it is accepted
        validate(compose_train([used_with, override]))


def test_the_wasserstein_critic_needs_a_constraint_and_the_penalty_refuses_critic_batchnorm():
    with pytest.raises(ConfigError, match="model.clip_value=0.0: .*Lipschitz"):
        validate(compose_train(["model.clip_value=0"]))
    with pytest.raises(ConfigError, match="model.critic_batchnorm=True: .*BatchNorm mixes"):
        validate(compose_train(["model.clip_value=0", "model.gp_weight=10"]))
    gp = validate(compose_train(["model=wgan_gp"])).model  # control: the penalty's own option is consistent
    assert (gp.gp_weight, gp.clip_value, gp.critic_batchnorm, gp.adam_beta1, gp.adam_beta2) == (10, 0, False, 0, 0.9)
    assert validate(compose_train(["model=gan"])).model.clip_value == 0  # the GAN needs no constraint


def test_a_missing_ckpt_path_is_rejected_with_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path='.*gone.ckpt': expected an existing checkpoint file"):
        validate(compose_train([f"ckpt_path={tmp_path}/gone.ckpt"]))


def test_device_resident_refuses_worker_processes():
    with pytest.raises(ConfigError, match="data.num_workers=2.*device_resident"):
        validate(compose_train(["data.device_resident=true", "data.num_workers=2"]))
    validate(compose_train(["data.device_resident=true"]))
    validate(compose_train(["data.num_workers=2"]))


# ---- the trainer options -------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["ddp", "ddp_cpu"])
def test_ddp_options_find_unused_parameters(option):
    # The critic step leaves the generator without gradients: DDP without it fails on the second step.
    trainer = dict(compose_train([f"trainer={option}"]).trainer)
    if option == "ddp" and not torch.cuda.is_available():
        trainer.update(accelerator="cpu", devices=2)  # same strategy, built without GPUs
    t = L.Trainer(**trainer, logger=False)
    assert isinstance(t.strategy, DDPStrategy)
    assert t.strategy._ddp_kwargs.get("find_unused_parameters") is True
    if option == "ddp_cpu":
        assert t.num_devices == 2 and t.strategy.root_device.type == "cpu"
        assert t.strategy._get_process_group_backend() == "gloo"


def test_ddp_option_takes_every_gpu_and_scales_to_nodes():
    t = compose_train(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]).trainer
    assert (t.accelerator, t.devices, t.num_nodes) == ("gpu", 4, 2)
    assert compose_train(["trainer=ddp"]).trainer.devices == -1


@needs_gpu
@pytest.mark.parametrize("overrides", [["trainer=gpu", "trainer.precision=bf16-mixed"], ["trainer=ddp"]])
def test_gpu_options_build_a_trainer_on_gpus(overrides):
    t = L.Trainer(**validate(compose_train(overrides)).trainer, logger=False)
    assert t.strategy.root_device.type == "cuda"


def test_slurm_launcher_option_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="optional extra: pip install -e .[slurm]")
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.nodes=2",
                         "hydra.launcher.tasks_per_node=4"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 1)
    assert cfg.trainer.num_nodes == 2


def test_sweep_and_run_dirs_carry_microseconds_so_sweeps_started_in_one_second_differ():
    first, second = (compose_train([], hydra=True).hydra for _ in range(2))
    assert first.sweep.dir != second.sweep.dir and first.run.dir != second.run.dir
    assert first.sweep.dir.rsplit("/", 1)[0] == second.sweep.dir.rsplit("/", 1)[0]  # same date folder
    assert OmegaConf.to_container(first.sweep)["subdir"] == "${hydra.job.num}"  # one subdirectory per job


def test_cpu_15min_preset_is_bounded_by_time_alone():
    from lightning.pytorch.callbacks import Timer

    cfg = validate(compose_train(["experiment=fashion_cpu_15min"]))
    assert cfg.trainer["max_time"] == "00:00:15:00" and cfg.trainer["max_epochs"] == -1 and cfg.max_gen_steps == -1
    trainer = L.Trainer(**{**cfg.trainer, "accelerator": "cpu"}, logger=False, enable_checkpointing=False)
    (timer,) = [c for c in trainer.callbacks if isinstance(c, Timer)]
    assert timer._duration == 15 * 60


# ---- through the command line --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["model.n_critic=abc"], "Error: model.n_critic=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["model.n_critic=0"], "Error: model.n_critic=0: expected an integer >= 1"),
    (["model.clip_value=-1"], "Error: model.clip_value=-1.0: expected a number >= 0"),
    (["data=nope"], "Could not find 'data/nope' (available: celeba, fashion_mnist, folder)"),
    # a sweep job's values are checked as it starts (tests/test_cli.py); a job that cannot be composed, up front
    (["-m", "model.n_critic=2,abc"], "Error: in sweep job model.n_critic=abc: model.n_critic=abc: Value 'abc'"),
    (["trainer.limit_trian_batches=2"], "Error: trainer.limit_trian_batches: not an argument of lightning.Trainer"),
    (["trainer.precision=foo"], "Error: trainer.precision='foo': lightning.Trainer refused it"),
    (["trainer=gpu"] if not torch.cuda.is_available() else ["trainer.max_time=soon"], "Error: trainer."),
])
def test_command_line_rejects_bad_input_in_one_line_before_writing_anything(tmp_path, args, expected):
    proc = run_cli(["-m", "wgan_lit.train", *args], cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "HYDRA_FULL_ERROR" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a rejected command line"


# ---- every key: a wrong type and, where values are ruled, a wrong value, each one line naming the key --------


def leaf_keys(node, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in node.items():
        if key == "trainer":
            continue  # open: checked by Lightning (test_a_bad_trainer_argument_is_one_line_naming_it)
        if hasattr(value, "items"):
            out.update(leaf_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


KEYS = leaf_keys(OmegaConf.structured(TrainConfig))


@pytest.mark.parametrize("key", sorted(KEYS))
def test_every_key_with_a_wrong_type_is_one_line_naming_it(key):
    from wgan_lit.cli import describe

    default = KEYS[key]
    wrong = "[1,2]" if isinstance(default, str) else "maybe" if isinstance(default, bool) else "abc"
    with pytest.raises(ConfigCompositionException) as err:
        compose_train([f"{key}={wrong}"])
    message = describe(err.value)
    assert message.startswith(f"{key}={wrong}: ") and "\n" not in message, message


WRONG_VALUES = {
    "model.n_critic": "0", "model.clip_value": "0", "model.lr_g": "0", "model.lr_d": "-1", "model.latent_dim": "0",
    "model.g_features": "0", "model.d_features": "0", "model.optimizer": "sgd", "model.n_fixed_samples": "0",
    "data.name": "mnist", "data.batch_size": "0", "data.image_size": "30", "data.num_workers": "-1",
    "data.split": "valid", "data.center_crop": "-1", "data.download": "true",
    "logger.name": "wandb", "logger.log_every_n_gen_steps": "0", "logger.sample_every_n_gen_steps": "-1",
    "max_gen_steps": "0", "checkpoint_every_n_epochs": "0", "checkpoint_every_n_gen_steps": "-1",
    "ckpt_path": "/no/such.ckpt", "cpu_threads": "-1", "metrics.every_n_gen_steps": "-1",
    "metrics.n_samples": "1", "metrics.kid_subsets": "0", "metrics.kid_subset_size": "1",
    "metrics.checkpoint_monitor": "fid", "metrics.every_n_seconds": "-1",
    "model.gp_weight": "-1", "model.critic_batchnorm": "true", "model.loss": "hinge", "model.generator": "resnet",
    "model.critic": "resnet", "model.n_extra_layers": "-1", "model.mlp_layers": "0", "model.ema_decay": "1",
    "model.adam_beta1": "0.9", "model.adam_beta2": "0.5",
    "fast_path.iters": "1", "fast_path.rounds": "0", "fast_path.probe": "true", "trainer.precision": "32-true",
    "runtime.channels_last": "false", "runtime.compile": "true",
}
CONTEXT = {"data.download": ["data=celeba"],  # only fashion_mnist downloads
           "model.critic_batchnorm": ["model=wgan_gp"], "model.mlp_layers": ["model.generator=mlp"],
           "fast_path.probe": ["trainer=ddp_cpu"],
           **{k: ["fast_path.probe=true"] for k in ("trainer.precision", "runtime.channels_last", "runtime.compile")}}


def test_the_wrong_value_table_covers_every_ruled_key():
    from wgan_lit.config import _rules

    assert {key for key, *_ in _rules(TrainConfig())} == set(WRONG_VALUES)


@pytest.mark.parametrize("key", sorted(WRONG_VALUES))
def test_every_key_with_a_wrong_value_is_one_line_naming_it_and_its_default_passes(key):
    with pytest.raises(ConfigError) as err:
        validate(compose_train([*CONTEXT.get(key, []), f"{key}={WRONG_VALUES[key]}"]))
    assert str(err.value).startswith(f"{key}=") and "expected" in str(err.value) and "\n" not in str(err.value)
    validate(compose_train(CONTEXT.get(key, [])))  # control: the same without the wrong value is fine
