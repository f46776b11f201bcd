"""callbacks.py: their order, what LastCheckpoint writes and when, per-rank RNG states, the divergence guard,
one run directory per DDP run."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist

import wgan_lit.data as data_mod
from tests.conftest import TINY, load, tiny_config, write_fake_fashion_mnist
from wgan_lit.callbacks import (
    GeneratorStepLimit,
    HParamsSummary,
    LastCheckpoint,
    OneRunDir,
    OneRunDirError,
    ResumeState,
    RunProgressBar,
    build_callbacks,
)
from wgan_lit.data import build_datamodule
from wgan_lit.metrics import SampleQualityCallback
from wgan_lit.module import WGAN, DivergenceError
from wgan_lit.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fmnist", n_train=128)


def test_the_callbacks_come_in_the_order_they_need(tmp_path, data):
    cfg = tiny_config(data, 5)
    cfg.metrics.every_n_gen_steps = 2
    extra = L.Callback()
    kinds = [type(c) for c in build_callbacks(cfg, tmp_path, build_datamodule(cfg.data), [extra])]
    # The last scoring must see GeneratorStepLimit's stop to score the final model; HParamsSummary sees every
    # metric logged before the end; LastCheckpoint is a Checkpoint, which Lightning runs after all others.
    assert kinds.index(GeneratorStepLimit) < kinds.index(SampleQualityCallback)
    assert kinds[-1] is HParamsSummary and kinds[-2] is L.Callback
    assert kinds.count(LastCheckpoint) == 1 and kinds.index(ResumeState) == 0
    cfg.trainer["enable_checkpointing"] = False  # Lightning's switch turns ours off too
    assert LastCheckpoint not in [type(c) for c in build_callbacks(cfg, tmp_path, build_datamodule(cfg.data))]


def count_writes(monkeypatch) -> list[str]:
    written: list[str] = []
    real = L.Trainer.save_checkpoint

    def recording(self, filepath, weights_only=False, storage_options=None):
        written.append(Path(filepath).name)
        return real(self, filepath, weights_only, storage_options)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", recording)
    return written


@pytest.mark.parametrize("n_critic,writes", [(2, 3), (5, 6)])
def test_last_ckpt_is_written_once_per_save_point(tmp_path, data, monkeypatch, n_critic, writes):
    written = count_writes(monkeypatch)
    cfg = tiny_config(data, 6, n_critic=n_critic)  # 8 batches per epoch
    cfg.checkpoint_every_n_gen_steps = 2
    cfg.checkpoint_every_n_epochs = 100
    train(cfg, tmp_path)
    # Save points: generator steps 2, 4, 6 (6 is also the stop) and each epoch end. n_critic=2: step 4 is batch 8,
    # the end of epoch 0: 3 writes. n_critic=5: steps at batches 10, 20, 30, epoch ends at 8, 16, 24: 6 writes
    # (not 5 per step: the generator step's batch is followed by n_critic - 1 with the same step count).
    assert written.count("last.ckpt") == writes, written
    assert load(tmp_path / "checkpoints/last.ckpt")["wgan_counters"]["gen_step"] == 6


def test_an_epoch_file_exists_only_for_a_finished_epoch(tmp_path, data):
    cfg = tiny_config(data, 6)  # 4 generator steps per epoch: epoch 0 ends at step 4, the run stops mid-epoch 1
    train(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["epoch000-gen4.ckpt", "last.ckpt"]
    ckpt = load(tmp_path / "checkpoints/epoch000-gen4.ckpt")
    assert ckpt["epoch"] == 0 and ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 8


def test_resuming_from_an_epoch_file_is_exact(tmp_path, data):
    train(tiny_config(data, 6), tmp_path / "straight")
    train(tiny_config(data, 4), tmp_path / "run")  # stops at epoch 0's last batch: its epoch file and last.ckpt
    train(tiny_config(data, 6, ckpt_path=str(tmp_path / "run/checkpoints/epoch000-gen4.ckpt")), tmp_path / "run")
    a, b = load(tmp_path / "straight/checkpoints/last.ckpt"), load(tmp_path / "run/checkpoints/last.ckpt")
    assert a["epoch"] == b["epoch"] == 1 and a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_a_stop_asked_by_any_callback_mid_epoch_is_saved_at_that_batch(tmp_path, data):
    """trainer.max_time's Timer (like any callback after ours in the list) stops the run at a batch end."""

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.gen_step == 3:
                trainer.should_stop = True

    train(tiny_config(data, max_gen_steps=-1), tmp_path / "run", extra_callbacks=[StopAt()])
    assert load(tmp_path / "run" / "checkpoints" / "last.ckpt")["wgan_counters"]["gen_step"] == 3


# ---- RNG states per rank -----------------------------------------------------------------------------------


def start(world_size: int, rank: int, gen_step: int, restore: list | None = None) -> torch.Tensor:
    """The noise a rank draws after ResumeState.on_train_start."""
    torch.manual_seed(0)
    callback = ResumeState(seed=0)
    callback._to_restore = restore
    trainer = SimpleNamespace(world_size=world_size, global_rank=rank, optimizers=[])
    callback.on_train_start(trainer, SimpleNamespace(gen_step=gen_step, hparams={}))
    return torch.randn(8)


def saved_states() -> dict:
    """This process's RNG states as ResumeState writes them into a checkpoint."""
    checkpoint: dict = {}
    ResumeState(seed=0).on_save_checkpoint(SimpleNamespace(world_size=1), None, checkpoint)
    return checkpoint["rng_states"][0]


def test_fresh_ranks_draw_their_own_noise_and_a_single_process_is_left_alone():
    assert not torch.equal(start(2, 0, 0), start(2, 1, 0))  # ranks differ
    assert torch.equal(start(2, 1, 0), start(2, 1, 0))  # reproducible
    torch.manual_seed(0)
    untouched = torch.randn(8)
    assert torch.equal(start(1, 0, 0), untouched)  # one process: the RNG is not touched


def test_a_resumed_rank_gets_its_own_saved_state_back():
    states = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        states.append(saved_states())
    torch.manual_seed(11)
    expected = torch.randn(8)
    assert torch.equal(start(2, 1, 5, restore=states), expected)  # rank 1 continues rank 1's stream
    assert not torch.equal(start(2, 0, 5, restore=states), expected)  # control: rank 0 gets rank 0's


def test_a_checkpoint_of_another_world_size_reseeds_with_a_warning():
    with pytest.warns(UserWarning, match="RNG states of 1 processes, this run has 2"):
        noise = start(2, 1, 5, restore=[saved_states()])
    with pytest.warns(UserWarning):
        assert not torch.equal(noise, start(2, 1, 6, restore=[saved_states()]))  # seeded by step too


# ---- the divergence guard --------------------------------------------------------------------------------


def nan_after(n_batches: int):
    """A stand-in for data.to_unit_range whose batches turn to NaN from batch ``n_batches`` on."""
    real, calls = data_mod.to_unit_range, [0]

    def to_unit_range(batch):
        calls[0] += 1
        out = real(batch)
        return out.fill_(float("nan")) if calls[0] > n_batches else out

    return to_unit_range


@pytest.mark.parametrize("log_every", [1, 100], ids=["caught-at-a-log-point", "caught-at-a-checkpoint-write"])
def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, data, monkeypatch, log_every):
    # n_critic=2: batches 0-1 -> generator step 1, 2-3 -> 2, 4-5 -> 3, 6-7 -> 4. Batch 6 is NaN: step 4.
    monkeypatch.setattr(data_mod, "to_unit_range", nan_after(6))
    cfg = tiny_config(data, 8)
    cfg.logger.log_every_n_gen_steps = log_every
    cfg.checkpoint_every_n_gen_steps = 1  # a write is due right after the bad step: it must not happen
    with pytest.raises(DivergenceError) as err:
        train(cfg, tmp_path / "run")
    assert err.value.gen_step == 4 and "NaN or inf at generator step 4" in str(err.value)
    last = load(tmp_path / "run/checkpoints/last.ckpt")
    assert last["wgan_counters"]["gen_step"] == 3  # the last good one, not overwritten
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_the_step_of_a_divergence_is_absolute_after_a_resume(tmp_path, data, monkeypatch):
    train(tiny_config(data, 3), tmp_path)  # generator step 3
    monkeypatch.setattr(data_mod, "to_unit_range", nan_after(2))  # resumed batches 1-2: step 4; batch 3: step 5
    with pytest.raises(DivergenceError, match="at generator step 5"):
        train(tiny_config(data, 8, ckpt_path=str(tmp_path / "checkpoints/last.ckpt")), tmp_path)


# ---- one run directory under DDP --------------------------------------------------------------------------


@pytest.mark.parametrize("same", [True, False])
def test_ranks_started_separately_must_share_one_run_dir(tmp_path, monkeypatch, same):
    # torchrun/srun start every rank themselves, and each resolves ${now:...} in hydra.run.dir on its own.
    rank1_dir = str((tmp_path / ("a" if same else "b")).resolve())

    def all_gather_object(out: list, obj: str) -> None:  # what rank 0 would receive from a 2-process group
        out[:] = [obj, rank1_dir]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    check = OneRunDir(tmp_path / "a")
    if same:
        check.setup(SimpleNamespace(world_size=2), None, "fit")
        return
    with pytest.raises(OneRunDirError) as err:
        check.setup(SimpleNamespace(world_size=2), None, "fit")
    assert "chose different run directories" in str(err.value) and f"rank 1: {rank1_dir}" in str(err.value)
    assert "hydra.run.dir=" in str(err.value)  # the fix


# ---- what the user sees: the start-up summary and the whole-run progress ------------------------------------


def test_a_run_starts_with_one_summary_and_logs_its_progress_in_lines(tmp_path, data, caplog):
    cfg = tiny_config(data, 6)
    cfg.trainer["enable_progress_bar"] = True  # not a terminal here: progress comes as log lines
    with caplog.at_level(logging.INFO, logger="wgan_lit"):
        train(cfg, tmp_path)
    messages = [r.getMessage() for r in caplog.records if r.name == "wgan_lit.callbacks"]
    (summary,) = [m for m in messages if m.startswith("Training:")]
    assert "device      cpu x 1 process(es), precision 32-true" in summary
    assert "data        fashion_mnist (train): 128 images of 1 x 28 x 28, batch 16 per process" in summary
    assert "epoch       8 batches = 4 generator steps (n_critic=2)" in summary
    assert ("ends at     max_gen_steps=6 (6 generator steps) or" not in summary
            and "ends at     max_gen_steps=6 (6 generator steps)" in summary)  # 10 epochs would be 40 steps
    assert f"outputs     {tmp_path}" in summary
    lines = [m for m in messages if m.startswith("generator step")]
    assert [m.split(",")[0] for m in lines] == [f"generator step {k}/6 ({100 * k / 6:.0f}%)" for k in range(1, 7)]
    assert all("steps/s" in m and "left" in m for m in lines)


def test_in_a_terminal_one_bar_counts_generator_steps_to_the_binding_bound(tmp_path, data):
    seen = []

    class Watch(L.Callback):
        def on_train_end(self, trainer, pl_module):
            bar = trainer.progress_bar_callback.train_progress_bar
            seen.append((bar.total, bar.n, bar.desc))

    cfg = tiny_config(data, -1)
    cfg.trainer.update(max_epochs=2, enable_progress_bar=True)  # 2 epochs x 4 generator steps bind
    callbacks = build_callbacks(cfg, tmp_path, build_datamodule(cfg.data))
    bar = next(c for c in callbacks if isinstance(c, RunProgressBar))
    bar.interactive = True
    trainer = L.Trainer(**cfg.trainer, logger=False, callbacks=[*callbacks, Watch()], default_root_dir=tmp_path)
    trainer.fit(WGAN(n_critic=2, **TINY), datamodule=build_datamodule(cfg.data))
    assert seen == [(8, 8, "generator steps: ")]  # one bar for the run, not 8 batches per epoch


def test_the_next_start_of_a_run_removes_what_a_killed_writer_left(tmp_path, data):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / f"last.ckpt.tmp-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    train(tiny_config(data, 1), tmp_path)
    assert not stale.exists() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
