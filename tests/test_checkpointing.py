"""checkpointing.py: all-or-nothing writes, one line for a file that is no checkpoint, the resume check's culprits."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import LEGACY_CKPT, LEGACY_EMA_CKPT, TINY_ARGS, assert_one_error, make_folder, run_cli, tiny_config
from wgan_lit import checkpointing as ck
from wgan_lit.module import WGAN
from wgan_lit.train import train


def test_a_write_that_fails_halfway_leaves_the_old_file_intact_and_no_temporary(tmp_path):
    target = tmp_path / "last.ckpt"
    ck.AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, target)  # how Lightning writes them
    before = target.read_bytes()
    with pytest.raises(Exception, match="pickle"):  # after the tensor, a lambda torch.save cannot write
        ck.atomic_torch_save({"step": 2, "w": torch.zeros(1000), "bad": lambda: None}, target)
    assert target.read_bytes() == before and torch.load(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]

@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_writer_killed_mid_write_leaves_the_old_file_whole_and_only_its_temporary_is_removed(tmp_path):
    target = tmp_path / "last.ckpt"
    ck.atomic_torch_save({"i": 1, "w": torch.arange(1000.0)}, target)
    read, write = os.pipe()
    if (pid := os.fork()) == 0:  # the writer: half of the next checkpoint, then it waits to be killed
        try:
            with ck.atomic_write(target) as tmp:
                tmp.write_bytes(b"PK\x03\x04 the first half of the next checkpoint")
                os.write(write, b"x")
                time.sleep(120)
        finally:
            os._exit(1)  # never back into pytest
    os.read(read, 1)
    os.kill(pid, signal.SIGKILL)  # no cleanup runs
    os.waitpid(pid, 0)
    stale = tmp_path / f"last.ckpt.tmp-{pid}"
    assert stale.is_file() and torch.load(target, weights_only=True)["i"] == 1  # the old checkpoint, whole
    live = tmp_path / f"last.ckpt.tmp-{os.getpid()}"  # a live writer's file (this process's)
    live.write_bytes(b"being written")
    assert ck.remove_stale_temporaries(tmp_path) == [stale] and live.exists() and not stale.exists()

BAD_FILES = {  # how to make it, what the line says
    "missing": (lambda p: None, "no such file"), "folder": (lambda p: p.mkdir(), "is a folder, not a file"),
    "empty": (lambda p: p.write_bytes(b""), "the file is empty (a write that never finished?)"),
    "text": (lambda p: p.write_text("hello"), "not a PyTorch checkpoint (a .ckpt file is a zip archive; this file"),
    "truncated": (lambda p: p.write_bytes(LEGACY_CKPT.read_bytes()[:3000]), "the file is truncated or corrupt"),
    "objects": (lambda p: torch.save({"where": Path("x")}, p), "holds Python objects other than tensors and plain"),
    "tensors": (lambda p: torch.save({"w": torch.zeros(3)}, p), "not a wgan_lit training checkpoint (no state_dict"),
    "other": (lambda p: torch.save({"state_dict": {}, "hyper_parameters": {}}, p), "a Lightning checkpoint of another"),
}

@pytest.mark.parametrize("case", BAD_FILES)
def test_a_file_that_is_no_usable_checkpoint_is_one_line_naming_it_and_what_to_pass(tmp_path, case):
    make, why = BAD_FILES[case]
    make(path := tmp_path / "x.ckpt")
    with pytest.raises(ck.CheckpointError) as err:
        ck.read_checkpoint(path, "ckpt_path")
    msg = str(err.value)
    assert msg.startswith(f"ckpt_path {path}: ") and why in msg and "\n" not in msg
    assert msg.endswith("Pass a .ckpt file from a run's checkpoints/ folder, e.g. outputs/<date>/<time>/checkpoints/"
                        "last.ckpt")

LEGACY = {"latent_dim": 8, "g_features": 4, "d_features": 4}  # the settings of the e089f38 checkpoints
EMA_MLP = {**LEGACY, "critic": "mlp", "ema_decay": 0.999}

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """e089f38's (written before wgan_runtime), an MLP critic's with an averaged generator, and e089f38's with the
    critic's first weight cut: a wgan_lit whose networks were built otherwise (no setting to name: the weight)."""
    folder = tmp_path_factory.mktemp("ckpts")
    model = WGAN(log_every_n_gen_steps=1, n_critic=2, n_fixed_samples=4, **EMA_MLP)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, folder / "ema_mlp.ckpt")
    edited = ck.read_checkpoint(LEGACY_CKPT)
    edited["state_dict"]["critic.net.0.weight"] = edited["state_dict"]["critic.net.0.weight"][:2]
    torch.save(edited, folder / "edited.ckpt")
    return {"plain": LEGACY_CKPT, "ema": LEGACY_EMA_CKPT, "ema_mlp": folder / "ema_mlp.ckpt",
            "edited": folder / "edited.ckpt"}

def says(key: str, old: object, new: object) -> str:
    return f"{key}: checkpoint has {old!r}, the config gives {new!r}"

# (checkpoint, its model settings, the change, what the message says): every setting that changes the set or the
# shapes of the weights, and the optimizer, whose saved state fits only its own kind.
CHANGES = {f"{k}={new}": ("plain", {k: new}, [says(f"model.{k}", old, new)]) for k, old, new in [
    ("latent_dim", 8, 32), ("g_features", 4, 16), ("d_features", 4, 8), ("critic_batchnorm", True, False),
    ("g_batchnorm", True, False), ("generator", "dcgan", "mlp"), ("critic", "dcgan", "mlp"), ("n_extra_layers", 0, 1),
    ("ema_decay", 0.0, 0.999), ("n_fixed_samples", 4, 8), ("optimizer", "rmsprop", "adam")]} | {
    "mlp_layers": ("ema_mlp", {"mlp_layers": 2}, [says("model.mlp_layers", 4, 2)]),
    "ema_decay-0.9-to-0": ("ema", {"ema_decay": 0.0}, [says("model.ema_decay", 0.9, 0.0)]),
    "image_size": ("plain", {"image_size": 32}, [says("data.image_size", 28, 32)]),
    "channels": ("plain", {"name": "folder"}, [says("channels (set by data.name)", 1, 3)]),
    "with-a-harmless-change": ("plain", {"n_extra_layers": 1, "lr_d": 1e-3}, [says("model.n_extra_layers", 0, 1)]),
    "two-at-once": ("plain", {"latent_dim": 32, "d_features": 8},
                    [says("model.latent_dim", 8, 32), says("model.d_features", 4, 8)]),
    "other-weights": ("edited", {}, ["critic.net.0.weight: checkpoint has (2, 1, 4, 4), the networks of the config "
                                     "have (4, 1, 4, 4) with the same settings (another version of wgan_lit?)"]),
}

@pytest.mark.parametrize("case", CHANGES)
def test_resuming_with_a_setting_that_changes_the_weights_or_optimizer_names_that_setting(
        tmp_path, fake_fmnist, ckpts, case):
    which, change, expected = CHANGES[case]
    data_keys = {k: v for k, v in change.items() if k in ("image_size", "name")}
    trained_with = EMA_MLP if which == "ema_mlp" else {**LEGACY, "ema_decay": 0.9} if which == "ema" else LEGACY
    cfg = tiny_config(fake_fmnist, 8, ckpt_path=str(ckpts[which]),
                      **{**trained_with, **{k: v for k, v in change.items() if k not in data_keys}})
    for key, value in data_keys.items():
        setattr(cfg.data, key, value)
    if data_keys.get("name") == "folder":  # RGB pictures: three channels where Fashion-MNIST has one
        cfg.data.root = str(make_folder(tmp_path / "pictures"))
    with pytest.raises(ck.CheckpointError) as err:
        train(cfg, tmp_path / "run")
    msg = str(err.value)
    # The settings that differ, none of the others:
    assert all(fragment in msg for fragment in expected) and msg.count("checkpoint has") == len(expected), msg
    assert msg.startswith(f"ckpt_path {ckpts[which]}: does not fit") and len(msg.splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written

def test_an_e089f38_checkpoint_resumes_and_takes_a_new_averaging_decay_that_keeps_its_weights(tmp_path, fake_fmnist):
    """0.9 -> 0.99 keeps the averaged generator's weights (only how fast it moves changes): allowed."""
    train(tiny_config(fake_fmnist, 7, ckpt_path=str(LEGACY_EMA_CKPT), **{**LEGACY, "ema_decay": 0.99}), tmp_path)
    resumed = ck.read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed["wgan_counters"]["gen_step"] == 7 and resumed["hyper_parameters"]["ema_decay"] == 0.99
    assert int(resumed["state_dict"]["generator_ema.n_averaged"]) == 7  # the saved average went on
    assert "fused_clamp" not in resumed["hyper_parameters"] and resumed["wgan_runtime"]["precision"] == "32-true"

@pytest.mark.slow
def test_the_command_line_refuses_another_architecture_in_one_line_and_leaves_the_run_untouched(tmp_path, tiny_run):
    """model.n_extra_layers: a hand-kept key list missed it, Hydra wrote into the old run, then a traceback."""
    run_dir = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert run_dir / ".hydra" / "config.yaml" in before and run_dir / "checkpoints" / "last.ckpt" in before
    proc = run_cli(["-m", "wgan_lit.train", *TINY_ARGS, f"data.root={tiny_run.parent / 'fmnist'}",
                    "model.ema_decay=0.9", "model.n_extra_layers=1", f"ckpt_path={run_dir}/checkpoints/last.ckpt",
                    f"hydra.run.dir={run_dir}"], cwd=tmp_path, check=False)
    assert_one_error(proc.returncode, proc.stdout, proc.stderr, says("model.n_extra_layers", 0, 1))
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
