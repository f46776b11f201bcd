"""Resuming with a config whose networks or optimizer differ from the checkpoint's: the check compares the saved
weights' names and shapes with those of the model the config builds, and names the settings that differ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import (
    TINY_ARGS,
    assert_one_error,
    load,
    make_folder,
    run_cli,
    tiny_config,
    write_fake_fashion_mnist,
)
from wgan_lit.checkpointing import CheckpointError
from wgan_lit.train import train

TRAIN = ["-m", "wgan_lit.train"]
EMA_MLP = {"critic": "mlp", "ema_decay": 0.999}  # the second checkpoint: an averaged generator, an MLP critic


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fmnist", n_train=128)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data) -> dict[str, Path]:
    """One generator step each: the tiny DCGAN pair without averaging ("plain"), and EMA_MLP ("ema_mlp")."""
    found = {}
    for name, model in {"plain": {}, "ema_mlp": EMA_MLP}.items():
        run = tmp_path_factory.mktemp(name)
        train(tiny_config(data, 1, **model), run)
        found[name] = run / "checkpoints" / "last.ckpt"
    return found


# (checkpoint, the model settings it was trained with, the change, what the message must say). Every setting
# that changes the set or the shapes of the weights, and the optimizer, whose saved state fits only its own kind.
CHANGES = {
    "latent_dim": ("plain", {}, {"latent_dim": 32}, ["model.latent_dim: checkpoint has 16, the config gives 32"]),
    "g_features": ("plain", {}, {"g_features": 16}, ["model.g_features: checkpoint has 8, the config gives 16"]),
    "d_features": ("plain", {}, {"d_features": 4}, ["model.d_features: checkpoint has 8, the config gives 4"]),
    "critic_batchnorm": ("plain", {}, {"critic_batchnorm": False},
                         ["model.critic_batchnorm: checkpoint has True, the config gives False"]),
    "g_batchnorm": ("plain", {}, {"g_batchnorm": False},
                    ["model.g_batchnorm: checkpoint has True, the config gives False"]),
    "generator=mlp": ("plain", {}, {"generator": "mlp"},
                      ["model.generator: checkpoint has 'dcgan', the config gives 'mlp'"]),
    "critic=mlp": ("plain", {}, {"critic": "mlp"}, ["model.critic: checkpoint has 'dcgan', the config gives 'mlp'"]),
    "n_extra_layers": ("plain", {}, {"n_extra_layers": 1},
                       ["model.n_extra_layers: checkpoint has 0, the config gives 1"]),
    "mlp_layers": ("ema_mlp", EMA_MLP, {"mlp_layers": 2}, ["model.mlp_layers: checkpoint has 4, the config gives 2"]),
    "ema_decay-0-to-0.999": ("plain", {}, {"ema_decay": 0.999},
                             ["model.ema_decay: checkpoint has 0.0, the config gives 0.999"]),
    "ema_decay-0.999-to-0": ("ema_mlp", EMA_MLP, {"ema_decay": 0.0},
                             ["model.ema_decay: checkpoint has 0.999, the config gives 0.0"]),
    "n_fixed_samples": ("plain", {}, {"n_fixed_samples": 8},
                        ["model.n_fixed_samples: checkpoint has 4, the config gives 8"]),
    "image_size": ("plain", {}, {"image_size": 32}, ["data.image_size: checkpoint has 28, the config gives 32"]),
    "channels": ("plain", {}, {"name": "folder"},
                 ["channels (set by data.name): checkpoint has 1, the config gives 3"]),
    "optimizer": ("plain", {}, {"optimizer": "adam"},
                  ["model.optimizer: checkpoint has 'rmsprop', the config gives 'adam'"]),
    "with-a-harmless-change": ("plain", {}, {"n_extra_layers": 1, "lr_d": 1e-3},  # the rate is no suspect
                               ["model.n_extra_layers: checkpoint has 0, the config gives 1"]),
    "two-at-once": ("plain", {}, {"latent_dim": 32, "d_features": 4},
                    ["model.latent_dim: checkpoint has 16, the config gives 32",
                     "model.d_features: checkpoint has 8, the config gives 4"]),
}


@pytest.mark.parametrize("case", CHANGES)
def test_resuming_with_a_setting_that_changes_the_weights_or_optimizer_names_that_setting(
        tmp_path, data, checkpoints, case):
    which, trained_with, change, expected = CHANGES[case]
    ckpt = checkpoints[which]
    data_keys = {k: v for k, v in change.items() if k in ("image_size", "name")}
    model = {**trained_with, **{k: v for k, v in change.items() if k not in data_keys}}
    cfg = tiny_config(data, 2, ckpt_path=str(ckpt), **model)
    for key, value in data_keys.items():
        setattr(cfg.data, key, value)
    if data_keys.get("name") == "folder":  # RGB pictures: three channels where Fashion-MNIST has one
        cfg.data.root = str(make_folder(tmp_path / "pictures"))
    with pytest.raises(CheckpointError) as err:
        train(cfg, tmp_path / "run")
    msg = str(err.value)
    for fragment in expected:
        assert fragment in msg, (fragment, msg)
    assert msg.count("checkpoint has") == len(expected), msg  # the settings that differ, none of the others
    assert str(ckpt) in msg and len(msg.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written


def test_other_weights_under_the_same_settings_name_the_first_weight_that_differs(tmp_path, data, checkpoints):
    """A checkpoint of a wgan_lit whose networks were built otherwise: no setting to name, so the weight."""
    ckpt = load(checkpoints["plain"])
    ckpt["state_dict"]["critic.net.0.weight"] = ckpt["state_dict"]["critic.net.0.weight"][:4]
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError) as err:
        train(tiny_config(data, 2, ckpt_path=str(tmp_path / "edited.ckpt")), tmp_path / "run")
    assert ("critic.net.0.weight: checkpoint has (4, 1, 4, 4), the networks of the config have (8, 1, 4, 4) with "
            "the same settings") in str(err.value)


def test_a_change_of_ema_decay_that_keeps_the_weights_resumes(tmp_path, data, checkpoints):
    """0.999 -> 0.99 keeps the averaged generator's weights (only how fast it moves changes): allowed."""
    ckpt = checkpoints["ema_mlp"]
    train(tiny_config(data, 2, ckpt_path=str(ckpt), **{**EMA_MLP, "ema_decay": 0.99}), tmp_path)
    resumed = load(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed["wgan_counters"]["gen_step"] == 2 and resumed["hyper_parameters"]["ema_decay"] == 0.99
    assert int(resumed["state_dict"]["generator_ema.n_averaged"]) == 2  # the saved average went on


@pytest.mark.slow
def test_the_command_line_refuses_another_architecture_in_one_line_and_leaves_the_run_untouched(tmp_path, data):
    """model.n_extra_layers, which a hand-kept list of keys missed: Hydra wrote .hydra/config.yaml into the old
    run, then loading the weights failed with a traceback."""
    run_dir = tmp_path / "run"
    run_cli([*TRAIN, "trainer=cpu", f"data.root={data}", f"hydra.run.dir={run_dir}", "max_gen_steps=1",
             *TINY_ARGS], cwd=tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run_dir / ".hydra" / "config.yaml" in before and run_dir / "checkpoints" / "last.ckpt" in before
    proc = run_cli([*TRAIN, "trainer=cpu", f"data.root={data}", *TINY_ARGS, "model.n_extra_layers=1",
                    f"ckpt_path={run_dir}/checkpoints/last.ckpt", f"hydra.run.dir={run_dir}"],
                   cwd=tmp_path, check=False)
    assert_one_error(proc.returncode, proc.stdout, proc.stderr,
                     "model.n_extra_layers: checkpoint has 0, the config gives 1")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
