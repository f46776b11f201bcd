"""logger=mlflow and logger=wandb for real, with no network: what a tiny run logged, read back from MLflow's store
(its client API) and from W&B's offline run file; and a missing library is one line naming the pip extra."""

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_ARGS, assert_one_error, call, tiny_config
from wgan_lit.train import build_logger, main, train

GEN_STEPS = list(range(1, 7))  # curves every generator step of 6; grids at 0, 3 and 6 (Lightning's steps: 18)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored afterwards: WandbLogger sets it for the process
    monkeypatch.setenv("WANDB_SILENT", "true")


def run(data: Path, run_dir: Path, **logger) -> dict[str, float]:
    return train(tiny_config(data, 6, logger=dict(log_every_n_gen_steps=1, sample_every_n_gen_steps=3, **logger)),
                 run_dir)


def test_mlflow_logs_curves_grids_params_and_final_metrics_in_the_run_dir(tmp_path, fake_fmnist):
    from mlflow.tracking import MlflowClient

    final = run(fake_fmnist, tmp_path / "run", name="mlflow")
    client = MlflowClient(f"sqlite:///{tmp_path}/run/mlflow/mlflow.db")
    [found] = client.search_runs([client.get_experiment_by_name("wgan_lit").experiment_id])
    run_id = found.info.run_id
    assert found.info.status == "FINISHED"
    assert found.info.artifact_uri.startswith((tmp_path / "run/mlflow/artifacts").as_uri())
    assert [m.step for m in client.get_metric_history(run_id, "critic/wasserstein")] == GEN_STEPS
    assert found.data.params["model/clip_value"] == "0.01" and found.data.params["data/batch_size"] == "16"
    assert found.data.metrics["final/W"] == pytest.approx(final["W"])
    grids = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in grids) == [0, 3, 6]
    assert "timelapse.gif" in [a.path for a in client.list_artifacts(run_id)]

    other = f"sqlite:///{tmp_path}/run/mlflow/mlflow.db"  # logger.tracking_uri (this store: no second set-up)
    logger = build_logger(tiny_config(fake_fmnist, 6, logger=dict(name="mlflow", tracking_uri=other,
                                                                  experiment="mine")), tmp_path / "run2")
    logger.log_metrics({"x": 1.0}, step=5)
    logger.finalize("success")
    assert [m.step for m in MlflowClient(other).get_metric_history(logger.run_id, "x")] == [5]
    assert MlflowClient(other).get_experiment_by_name("mine") and not (tmp_path / "run2").exists()


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B run file: a 7-byte header, then LevelDB log blocks of 32 KiB, each record's
    pieces behind a 7-byte header (checksum, little-endian length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, piece, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if (left := 32768 - pos % 32768) < 7:  # a block's tail too short for a header: zeros
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        piece, pos = piece + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            out.append(Record.FromString(piece))
            piece = b""
    return out


def test_wandb_runs_offline_under_the_run_dir_and_logs_what_tensorboard_shows(tmp_path, fake_fmnist):
    final = run(fake_fmnist, tmp_path / "run", name="wandb", experiment="mine")
    [path] = (tmp_path / "run/wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(path)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert records[kinds.index("run")].run.project == "mine" and records[kinds.index("exit")].exit.exit_code == 0
    rows = [{"/".join(i.nested_key) or i.key: i.value_json for i in r.history.item} for r in records
            if r.HasField("history")]
    step_of = lambda key: [json.loads(row["trainer/global_step"]) for row in rows if key in row]  # noqa: E731
    assert step_of("critic/wasserstein") == GEN_STEPS
    assert step_of("samples/filenames") == [0, 3, 6] and step_of("timelapse/filenames") == [6]  # images: their files
    assert len(list(path.parent.glob("files/media/images/samples_*.png"))) == 3
    assert len(list(path.parent.glob("files/media/images/timelapse_*.gif"))) == 1
    [last] = [row for row in rows if "final/W" in row]
    assert json.loads(last["final/W"]) == pytest.approx(final["W"])
    config = {i.key: json.loads(i.value_json) for r in records if r.HasField("config") for i in r.config.update}
    assert config["model"]["clip_value"] == 0.01 and config["data"]["batch_size"] == 16
    online = build_logger(tiny_config(fake_fmnist, 6, logger=dict(name="wandb", online=True)), tmp_path / "o")
    assert not online._offline  # logger.online=true syncs (not started here: no network)


@pytest.mark.parametrize("name", ["mlflow", "wandb"])
def test_a_missing_library_is_one_error_naming_its_extra_and_nothing_is_written(tmp_path, monkeypatch, capsys,
                                                                                 name):
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed: import fails, find_spec finds nothing
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train", f"logger={name}", "trainer=cpu", *TINY_ARGS])
    assert_one_error(*call(lambda _: main(), [], capsys), f"logger.name='{name}'", f'pip install "wgan_lit[{name}]"')
    assert list(tmp_path.iterdir()) == []
