"""GPU, DDP and sweep configs: they compose and build, DDP keeps ranks identical, sweeps write one dir per job."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.strategies.launchers.subprocess_script import _hydra_subprocess_cmd
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf, open_dict
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import REPO, write_fake_fashion_mnist
from wgan_lit.config import register_configs, validate
from wgan_lit.distributed import NoisePerRank, OneRunDir, OneRunDirError, ddp_job

CONF = REPO / "conf"
PROBE = REPO / "tests" / "ddp_probe.py"
TINY = ["trainer.enable_progress_bar=false", "model.g_features=8", "model.d_features=8", "model.latent_dim=16",
        "model.n_fixed_samples=4", "data.batch_size=16", "model.n_critic=2", "max_gen_steps=3",
        "logger.log_every_n_gen_steps=1", "logger.sample_every_n_gen_steps=2"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
register_configs()


def make(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra)


# ---- the trainer options -------------------------------------------------------------------------------


def test_default_trainer_is_one_device():
    # devices=auto on a multi-GPU machine would make Lightning pick plain "ddp", which fails on the second step.
    t = validate(make([])).trainer
    assert (t.accelerator, t.devices, t.strategy) == ("auto", 1, "auto")


def test_gpu_option_is_one_device_with_selectable_precision():
    t = validate(make(["trainer=gpu", "trainer.precision=bf16-mixed"])).trainer
    assert (t.accelerator, t.devices, t.precision, t.max_epochs) == ("gpu", 1, "bf16-mixed", 5)


def test_ddp_option_takes_every_gpu_and_scales_to_nodes():
    t = validate(make(["trainer=ddp"])).trainer
    assert (t.accelerator, t.devices, t.num_nodes) == ("gpu", -1, 1)
    t = validate(make(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])).trainer
    assert (t.devices, t.num_nodes) == (4, 2)


@pytest.mark.parametrize("option", ["ddp", "ddp_cpu"])
def test_ddp_options_find_unused_parameters(option):
    # The critic step leaves the generator without gradients: DDP without it fails on the second step.
    trainer = validate(make([f"trainer={option}"])).trainer
    if option == "ddp" and not torch.cuda.is_available():
        trainer = dataclasses.replace(trainer, accelerator="cpu", devices=2)  # same strategy, built without GPUs
    t = L.Trainer(**dataclasses.asdict(trainer), logger=False)
    assert isinstance(t.strategy, DDPStrategy)
    assert t.strategy._ddp_kwargs.get("find_unused_parameters") is True
    if option == "ddp_cpu":
        assert t.num_devices == 2 and t.strategy.root_device.type == "cpu"
        assert t.strategy._get_process_group_backend() == "gloo"


@needs_gpu
@pytest.mark.parametrize("overrides", [["trainer=gpu", "trainer.precision=bf16-mixed"], ["trainer=ddp"]])
def test_gpu_options_build_a_trainer_on_gpus(overrides):
    t = L.Trainer(**dataclasses.asdict(validate(make(overrides)).trainer), logger=False)
    assert t.strategy.root_device.type == "cuda"


def test_slurm_launcher_option_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="optional extra: pip install -e .[slurm]")
    cfg = make(["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.nodes=2",
                "hydra.launcher.tasks_per_node=4"], hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 1)
    assert cfg.trainer.num_nodes == 2


def test_sweep_and_run_dirs_carry_microseconds_so_sweeps_started_in_one_second_differ():
    first, second = (make([], hydra=True).hydra for _ in range(2))
    assert first.sweep.dir != second.sweep.dir and first.run.dir != second.run.dir
    assert first.sweep.dir.rsplit("/", 1)[0] == second.sweep.dir.rsplit("/", 1)[0]  # same date folder
    assert OmegaConf.to_container(first.sweep)["subdir"] == "${hydra.job.num}"  # one subdirectory per job


# ---- Hydra and Lightning's DDP launcher -------------------------------------------------------------------


def test_under_multirun_ddp_ranks_rerun_only_this_job_in_its_directory(tmp_path, monkeypatch):
    cfg = make(["model.clip_value=0.02", "trainer=ddp_cpu"], hydra=True)
    job_dir = tmp_path / "multirun" / "sweep" / "1"
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(job_dir)
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.overrides.task = ["model.clip_value=0.02", "trainer=ddp_cpu"]
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "model.clip_value=0.01,0.02", "trainer=ddp_cpu"])
    HydraConfig.instance().set_config(cfg)
    try:
        with ddp_job():
            command, _ = _hydra_subprocess_cmd(local_rank=1)  # what Lightning will run for rank 1
    finally:
        HydraConfig.instance().cfg = None
    args = command[3:]  # after python -m <main module>
    assert args[:2] == ["model.clip_value=0.02", "trainer=ddp_cpu"]  # this job's values, not the sweep's lists
    assert "-m" not in args and "--multirun" not in args
    assert f'hydra.run.dir="{job_dir}"' in args


def test_a_ddp_job_leaves_no_process_group_or_launcher_variables_for_the_next(monkeypatch):
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with ddp_job():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29512", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
    assert not dist.is_initialized()
    assert "MASTER_PORT" not in os.environ and "LOCAL_RANK" not in os.environ


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


def test_noise_per_rank_differs_by_rank_and_by_resume_point_and_leaves_single_device_runs_alone():
    def noise_after(world_size: int, rank: int, gen_step: int) -> torch.Tensor:
        torch.manual_seed(0)
        NoisePerRank(seed=0).on_train_start(SimpleNamespace(world_size=world_size, global_rank=rank),
                                            SimpleNamespace(gen_step=gen_step))
        return torch.randn(8)

    assert not torch.equal(noise_after(2, 0, 0), noise_after(2, 1, 0))  # ranks differ
    assert torch.equal(noise_after(2, 1, 0), noise_after(2, 1, 0))  # reproducible
    assert not torch.equal(noise_after(2, 1, 0), noise_after(2, 1, 100))  # a resume does not replay the start
    torch.manual_seed(0)
    untouched = torch.randn(8)
    assert torch.equal(noise_after(1, 0, 0), untouched)  # one device: the RNG is not touched


# ---- real runs through the command line ---------------------------------------------------------------------


def run(script: list[str], args: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def probe_reports(job_dir: Path) -> list[dict]:
    return [json.loads((job_dir / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory) -> Path:
    """``-m model.clip_value=0.01,0.02 trainer=ddp_cpu``: two jobs, each two processes; returns the launch dir."""
    tmp = tmp_path_factory.mktemp("ddp_sweep")
    data = write_fake_fashion_mnist(tmp / "data", n_train=128)
    run([str(PROBE)], ["-m", "model.clip_value=0.01,0.02", "trainer=ddp_cpu", f"data.root={data}", *TINY], cwd=tmp)
    return tmp


@pytest.mark.slow
def test_ddp_sweep_writes_one_sweep_dir_with_one_subdir_per_job(ddp_sweep):
    sweeps = list((ddp_sweep / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps  # ranks > 0 start no sweep of their own
    assert sorted(p.name for p in sweeps[0].iterdir() if p.is_dir()) == ["0", "1"]
    assert not (ddp_sweep / "outputs").exists()
    for job in ("0", "1"):
        job_dir = sweeps[0] / job
        assert (job_dir / ".hydra").is_dir() and (job_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran here
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert len(list((job_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0's only


@pytest.mark.slow
@pytest.mark.parametrize("job,clip", [("0", 0.01), ("1", 0.02)])
def test_ddp_ranks_hold_identical_parameters_after_training(ddp_sweep, job, clip):
    (sweep,) = (ddp_sweep / "multirun").glob("*/*")
    r0, r1 = probe_reports(sweep / job)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["gen_step"] == r1["gen_step"] == 3 and r0["global_step"] == 3 * (2 + 1)  # critic + generator steps
    assert r0["end"] == r1["end"]  # critic and generator, bit for bit
    assert r0["noise"] != r1["noise"]  # each rank generates its own fakes
    assert r0["end"]["critic"] != r0["start"]["critic"] and r0["end"]["generator"] != r0["start"]["generator"]
    assert r0["max_abs_critic"] <= clip + 1e-7 and r0["max_abs_critic"] > clip / 2  # clipped, to this job's c


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_shards_of_the_data(ddp_sweep):
    (sweep,) = (ddp_sweep / "multirun").glob("*/*")
    r0, r1 = probe_reports(sweep / "0")
    # DistributedSamplerWrapper: Lightning shards the data module's own (resumable) sampler
    assert r0["sampler"] == r1["sampler"] and r0["sampler"].startswith("DistributedSampler")
    assert len(r0["indices"]) == len(r1["indices"]) == 64
    assert not set(r0["indices"]) & set(r1["indices"])
    assert set(r0["indices"]) | set(r1["indices"]) == set(range(128))


@pytest.mark.slow
def test_each_sweep_job_logs_its_hyperparameters_and_final_metrics_to_the_hparams_view(ddp_sweep):
    (sweep,) = (ddp_sweep / "multirun").glob("*/*")
    for job, clip in (("0", 0.01), ("1", 0.02)):
        acc = EventAccumulator(str(sweep / job / "tensorboard"))
        acc.Reload()
        content = acc.PluginTagToContent("hparams")
        session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hparams = session.session_start_info.hparams
        assert hparams["model/clip_value"].number_value == pytest.approx(clip)
        assert hparams["trainer/strategy"].string_value == "ddp_find_unused_parameters_true"
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        metrics = {m.name.tag for m in experiment.metric_infos}
        assert {"final/W", "final/g_loss", "final/gen_step"} <= metrics
        for tag in metrics:  # each metric has its value at the last generator step
            assert [e.step for e in acc.Scalars(tag)] == [3]
        assert acc.Scalars("final/W")[0].value == pytest.approx(acc.Scalars("critic/wasserstein")[-1].value)


@pytest.mark.slow
def test_single_ddp_run_uses_one_run_directory(tmp_path):
    data = write_fake_fashion_mnist(tmp_path / "data", n_train=128)
    proc = run(["-m", "wgan_lit.train"], ["trainer=ddp_cpu", f"data.root={data}", *TINY], cwd=tmp_path)
    runs = list((tmp_path / "outputs").glob("*/*"))
    assert len(runs) == 1, runs  # rank 1 wrote into rank 0's timestamped directory, not one of its own
    assert (runs[0] / "train_ddp_process_1.log").is_file()
    assert proc.stdout.count(f"Run directory: {runs[0]}") == 2  # both ranks report the same directory
