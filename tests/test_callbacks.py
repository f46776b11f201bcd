"""callbacks.py: the order, LastCheckpoint's files, per-rank RNG states, NaN guard, one run dir, what a run reports."""

import logging
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist

from tests.conftest import TINY, load, tiny_config, write_fake_fashion_mnist
from wgan_lit import callbacks as cb
from wgan_lit.callbacks import LastCheckpoint, ResumeState, RunReport, build_callbacks
from wgan_lit.data import build_datamodule
from wgan_lit.metrics import SampleQualityCallback
from wgan_lit.module import WGAN, DivergenceError
from wgan_lit.train import train

QUIET = {"log_every_n_gen_steps": 100, "sample_every_n_gen_steps": 0}  # no curves, no grids: what is not tested


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("data") / "fmnist", n_train=128)  # 8 batches an epoch


def test_the_callbacks_come_in_the_order_they_need(tmp_path, data):
    cfg = tiny_config(data, 5)
    cfg.metrics.every_n_gen_steps = 2
    kinds = [type(c) for c in build_callbacks(cfg, tmp_path, build_datamodule(cfg.data), [L.Callback()])]
    # The last scoring must see GeneratorStepLimit's stop to score the final model; RunReport sees every metric
    # logged before the end; LastCheckpoint is a Checkpoint, which Lightning runs after all others.
    assert kinds.index(cb.GeneratorStepLimit) < kinds.index(SampleQualityCallback)
    assert kinds[-2:] == [L.Callback, RunReport] and kinds.count(LastCheckpoint) == 1 and kinds[0] is ResumeState
    cfg.trainer["enable_checkpointing"] = False  # Lightning's switch turns ours off too
    assert LastCheckpoint not in [type(c) for c in build_callbacks(cfg, tmp_path, build_datamodule(cfg.data))]


@pytest.mark.parametrize("n_critic,every_n_epochs,writes,epoch_files", [
    (2, 1, 3, ["epoch000-gen4.ckpt"]), (5, 2, 6, ["epoch001-gen3.ckpt"])])
def test_last_ckpt_is_written_once_per_save_point_and_an_epoch_file_at_each_kth_finished_epoch(
        tmp_path, data, monkeypatch, n_critic, every_n_epochs, writes, epoch_files):
    written, real = [], L.Trainer.save_checkpoint
    monkeypatch.setattr(L.Trainer, "save_checkpoint", lambda self, path, *a, **k: (
        written.append(Path(path).name), real(self, path, *a, **k))[1])
    cfg = tiny_config(data, 6, n_critic=n_critic, logger=QUIET)
    cfg.checkpoint_every_n_gen_steps, cfg.checkpoint_every_n_epochs = 2, every_n_epochs
    train(cfg, tmp_path)
    # Save points: generator steps 2, 4, 6 (6 is also the stop) and each epoch end. n_critic=2: step 4 is batch 8,
    # the end of epoch 0: 3 writes. n_critic=5: steps at batches 10, 20, 30, epoch ends at 8, 16, 24: 6 writes
    # (not 5 per step: the generator step's batch is followed by n_critic - 1 with the same step count).
    assert written.count("last.ckpt") == writes, written
    assert load(tmp_path / "checkpoints/last.ckpt")["wgan_counters"]["gen_step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch*")) == epoch_files  # finished, k-th
    loops = load(tmp_path / "checkpoints" / epoch_files[0])["loops"]["fit_loop"]  # at its last batch, with its place
    assert loops["epoch_loop.batch_progress"]["current"]["processed"] == 8


def start(world_size: int, rank: int, gen_step: int, restore: list | None = None) -> torch.Tensor:
    """The noise a rank draws after ResumeState.on_train_start."""
    torch.manual_seed(0)
    (callback := ResumeState(seed=0))._to_restore = restore
    callback.on_train_start(SimpleNamespace(world_size=world_size, global_rank=rank, optimizers=[]),
                            SimpleNamespace(gen_step=gen_step, hparams={}))
    return torch.randn(8)


def saved_states(seed: int) -> dict:
    """The RNG states of this process, seeded so, as ResumeState writes them into a checkpoint."""
    torch.manual_seed(seed)
    ResumeState(seed=0).on_save_checkpoint(SimpleNamespace(world_size=1), None, checkpoint := {})
    return checkpoint["rng_states"][0]


def test_fresh_ranks_draw_their_own_noise_resumed_ones_their_saved_streams_and_other_world_sizes_reseed():
    assert not torch.equal(start(2, 0, 0), start(2, 1, 0)) and torch.equal(start(2, 1, 0), start(2, 1, 0))
    seeded = lambda seed: torch.randn(8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(start(1, 0, 0), seeded(0))  # one process: the RNG is not touched
    states, expected = [saved_states(10), saved_states(11)], seeded(11)
    assert torch.equal(start(2, 1, 5, restore=states), expected)  # rank 1 continues rank 1's stream
    assert not torch.equal(start(2, 0, 5, restore=states), expected)  # control: rank 0 gets rank 0's
    with pytest.warns(UserWarning, match="RNG states of 1 processes, this run has 2"):
        noise = start(2, 1, 5, restore=[saved_states(0)])
    with pytest.warns(UserWarning):
        assert not torch.equal(noise, start(2, 1, 6, restore=[saved_states(0)]))  # seeded by step too


def test_ranks_started_separately_must_share_one_run_dir(tmp_path, monkeypatch):
    # torchrun/srun start every rank themselves, and each resolves ${now:...} in hydra.run.dir on its own.
    rank1_dir = str((tmp_path / "a").resolve())
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), [obj, rank1_dir]))
    ResumeState(0, tmp_path / "a").setup(SimpleNamespace(world_size=2), None, "fit")  # the same: fine
    with pytest.raises(cb.OneRunDirError) as err:
        ResumeState(0, tmp_path / "b").setup(SimpleNamespace(world_size=2), None, "fit")
    assert "chose different run directories" in str(err.value) and f"rank 1: {rank1_dir}" in str(err.value)
    assert "hydra.run.dir=" in str(err.value)  # the fix


@pytest.mark.parametrize("log_every", [1, 100], ids=["caught-at-a-log-point", "caught-at-a-checkpoint-write"])
def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, data, log_every):
    class NaNFrom7(L.Callback):  # n_critic=2: batches 1-2 -> generator step 1, ..., 7-8 -> 4. Batch 7 is NaN: step 4
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= 6:
                batch.fill_(float("nan"))

    cfg = tiny_config(data, 8, logger={"log_every_n_gen_steps": log_every, "sample_every_n_gen_steps": 0})
    cfg.checkpoint_every_n_gen_steps = 1  # a write is due right after the bad step: it must not happen
    with pytest.raises(DivergenceError) as err:
        train(cfg, tmp_path / "run", [NaNFrom7()])
    assert err.value.gen_step == 4 and "NaN or inf at generator step 4" in str(err.value)
    last = load(tmp_path / "run/checkpoints/last.ckpt")
    assert last["wgan_counters"]["gen_step"] == 3  # the last good one, not overwritten
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_a_run_reports_start_and_progress_and_a_stop_any_callback_asks_is_saved_at_that_batch(tmp_path, data, caplog):
    """trainer.max_time's Timer (like any callback after ours in the list) stops the run at a batch end."""

    class StopAt3(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *_):
            trainer.should_stop |= pl_module.gen_step == 3

    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / f"last.ckpt.tmp-{2 ** 22 + 1}"  # what a writer (a pid > pid_max) killed left
    stale.write_bytes(b"half a checkpoint")
    cfg = tiny_config(data, 6, logger=QUIET)
    cfg.trainer["enable_progress_bar"] = True  # not a terminal here: progress comes as log lines
    with caplog.at_level(logging.INFO, logger="wgan_lit"):
        train(cfg, tmp_path, extra_callbacks=[StopAt3()])
    assert load(tmp_path / "checkpoints" / "last.ckpt")["wgan_counters"]["gen_step"] == 3 and not stale.exists()
    messages = [r.getMessage() for r in caplog.records if r.name == "wgan_lit.callbacks"]
    (summary,) = [m for m in messages if m.startswith("Training:")]
    assert "device      cpu x 1 process(es), precision 32-true" in summary
    assert "data        fashion_mnist (train): 128 images of 1 x 28 x 28, batch 16 per process" in summary
    assert "epoch       8 batches = 4 generator steps (n_critic=2)" in summary
    assert "ends at     max_gen_steps=6 (6 generator steps)\n" in summary  # 10 epochs would be 40 steps
    assert summary.endswith(f"outputs     {tmp_path}") and "resumed at" not in summary
    lines = [m for m in messages if m.startswith("generator step")]
    assert [m.split(",")[0] for m in lines] == [f"generator step {k}/6 ({100 * k / 6:.0f}%)" for k in range(1, 4)]
    assert all("steps/s" in m and "left" in m for m in lines)


def test_in_a_terminal_one_bar_counts_generator_steps_to_the_binding_bound(tmp_path, data):
    cfg = tiny_config(data, -1, logger=QUIET)
    cfg.trainer.update(max_epochs=2, enable_checkpointing=False)  # 2 epochs x 4 generator steps bind
    report = RunReport(cfg, tmp_path, interactive=True)
    seen = []
    report.on_exception = lambda *_: seen.append((report.bar.total, report.bar.n, report.bar.desc))
    trainer = L.Trainer(**cfg.trainer, logger=False, callbacks=[report], default_root_dir=tmp_path)
    trainer.fit(WGAN(n_critic=2, **TINY), datamodule=build_datamodule(cfg.data))
    assert seen == [(8, 8, "generator steps")]  # one bar for the run, not 8 batches per epoch
