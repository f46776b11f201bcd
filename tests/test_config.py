"""Every config group option composes; bad values fail with the key's name before anything is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from tests.conftest import REPO
from wgan_lit.config import ConfigError, TrainConfig, register_configs, validate

CONF = REPO / "conf"
register_configs()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "data", "trainer", "logger") for o in options(g)]
                         + [("experiment", o) for o in options("experiment")])
def test_every_group_option_composes_and_validates(group, option):
    cfg = make([f"{group}={option}"])
    assert isinstance(validate(cfg), TrainConfig)


def test_trainer_options_inherit_the_default():
    cpu = make(["trainer=cpu"]).trainer
    assert cpu.accelerator == "cpu" and cpu.devices == 1 and cpu.max_epochs == make([]).trainer.max_epochs


def test_defaults_are_the_papers():
    cfg = validate(make([]))
    m = cfg.model
    paper = ("rmsprop", 5e-5, 5e-5, 0.01, 5, 100)
    assert (m.optimizer, m.lr_g, m.lr_d, m.clip_value, m.n_critic, m.latent_dim) == paper
    assert cfg.data.name == "fashion_mnist" and cfg.data.batch_size == 64


def test_every_value_is_overridable():
    cfg = validate(make(["model.clip_value=0.02", "model.n_critic=3", "data.batch_size=32", "trainer=cpu",
                         "max_gen_steps=7", "logger.sample_every_n_gen_steps=0"]))
    assert (cfg.model.clip_value, cfg.model.n_critic, cfg.data.batch_size, cfg.max_gen_steps) == (0.02, 3, 32, 7)


@pytest.mark.parametrize("override,key", [("model.n_critic=abc", "model.n_critic"),
                                          ("model.clip_value=big", "model.clip_value"),
                                          ("model.nope=1", "model.nope")])
def test_wrong_types_and_unknown_keys_fail_at_compose_time(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        make([override])
    assert key in str(err.value) or key in str(err.value.__cause__)


def test_unknown_group_option_lists_the_available_ones():
    with pytest.raises(Exception, match=r"(?s)Could not find 'data/nope'.*fashion_mnist"):
        make(["data=nope"])


@pytest.mark.parametrize("override,key", [
    ("model.n_critic=0", "model.n_critic=0"), ("model.clip_value=-1", "model.clip_value=-1.0"),
    ("model.lr_d=0", "model.lr_d=0.0"), ("data.batch_size=0", "data.batch_size=0"),
    ("data.image_size=30", "data.image_size=30"), ("model.optimizer=sgd", "model.optimizer='sgd'"),
    ("max_gen_steps=0", "max_gen_steps=0"),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, key):
    with pytest.raises(ConfigError, match="expected") as err:
        validate(make([override]))
    assert key in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("args,expected", [
    (["model.n_critic=abc"], "model.n_critic"),
    (["model.n_critic=0"], "model.n_critic=0: expected an integer >= 1"),
    (["model.clip_value=-1"], "model.clip_value=-1.0: expected a number > 0"),
    (["data=nope"], "Could not find 'data/nope'"),
    (["-m", "model.clip_value=0.01,-1"], "model.clip_value=-1.0: expected a number > 0"),
])
def test_command_line_rejects_bad_input_before_writing_anything(tmp_path: Path, args, expected):
    proc = subprocess.run([sys.executable, "-m", "wgan_lit.train", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**_env(), "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode != 0
    assert expected in proc.stderr + proc.stdout
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a rejected command line"


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}
