"""cli.py: the one key=value grammar of every command, its --help and its one-line errors; the train command line."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import pytest
import torch
from omegaconf import MISSING

from tests.conftest import TINY_ARGS, call, run_cli, write_fake_fashion_mnist
from wgan_lit import cli
from wgan_lit.config import validate

PATH_KEY, GPU, WRITE = ("path", "a checkpoint"), torch.cuda.is_available(), "to read a checkpoint write: python -m"
NO_FOO = f"'foo.ckpt': expected key=value, and no such path exists; {WRITE} wgan_lit.tool path=foo.ckpt"
TWO_X = f"'x.ckpt': expected key=value; {WRITE} wgan_lit.tool path=x.ckpt"
OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


@dataclass
class Tool:
    path: str = MISSING  # required
    n: int = 3
    sizes: list[int] = field(default_factory=list)


def parse(argv: list[str], capsys, check=lambda t: [], path_key=None) -> tuple[object, str, str]:
    """(the Tool, or the exit code; stdout; stderr) of cli.parse."""
    return call(lambda args: cli.parse(Tool, args, "wgan_lit.tool", "A tool.", check, path_key), argv, capsys)


def test_key_value_overrides_fill_the_schema_and_a_lone_existing_path_is_the_path_key(tmp_path, capsys):
    assert parse(["path=x.ckpt", "n=5", "sizes=[1,2]"], capsys)[0] == Tool(path="x.ckpt", n=5, sizes=[1, 2])
    assert parse(["path=y"], capsys)[0] == Tool(path="y")  # defaults from the dataclass
    (odd := tmp_path / "run (1),[x]" / "last.ckpt").parent.mkdir()  # commas, brackets: Hydra's grammar reads them
    odd.touch()
    assert parse([str(odd), "n=5"], capsys, path_key=PATH_KEY)[0] == Tool(path=str(odd), n=5)
    assert parse(["n=5", str(odd)], capsys, path_key=PATH_KEY)[0] == Tool(path=str(odd), n=5)  # anywhere
    assert parse([str(odd)], capsys) == (2, "", f"Error: '{odd}': expected key=value (--help lists the keys)\n")


@pytest.mark.parametrize("path_key", [None, PATH_KEY])
def test_help_lists_every_key_its_default_and_comment_and_the_path_alone(capsys, path_key):
    code, out, _ = parse(["--help"], capsys, path_key=path_key)
    assert code == 0 and out.startswith("usage: python -m wgan_lit.tool key=value") and "A tool." in out
    assert "  path=???  required" in out and "  n=3\n" in out and "  sizes=[]\n" in out
    assert ("python -m wgan_lit.tool PATH [key=value ...]   (PATH alone = path=PATH)" in out) == bool(path_key)


@pytest.mark.parametrize("argv,message", [
    (["path=x", "n=abc"], "n=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["path=x", "nope=1"], "Could not override 'nope': Key 'nope' not in 'Tool'"),
    (["path=x", "+nope=1"], "nope: not a key of this command (--help lists the keys)"),
    (["n=4"], "path is required: write path=VALUE (--help lists the keys)"),
    (["path=x", "n"], "'n': expected key=value (--help lists the keys)"),
    (["path=x", "n=3"], "n=3: expected an integer >= 4"),  # the command's check, through the same channel
    (["foo.ckpt"], NO_FOO), (["x.ckpt", "foo.ckpt"], NO_FOO),
    (["x.ckpt", "x.ckpt"], TWO_X), (["path=x.ckpt", "x.ckpt"], TWO_X),
    (["x.ckpt", "n"], "'n': expected key=value: write n=VALUE (--help lists the keys)"),
    (["x.ckpt", "--n"], "'--n': expected key=value (--help lists the keys)"),
])
def test_bad_input_is_one_error_line_with_exit_code_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # x.ckpt exists, foo.ckpt does not
    (tmp_path / "x.ckpt").touch()
    check = lambda t: cli.problems([("n", t.n, t.n >= 4, "an integer >= 4")])  # noqa: E731
    path_key = PATH_KEY if any(a.endswith(".ckpt") for a in argv) else None
    assert parse(argv, capsys, check, path_key) == (2, "", f"Error: {message}\n")
    assert parse(["path=x", "n=4"], capsys, check)[0] == Tool(path="x", n=4)  # control


@pytest.mark.parametrize("argv,checked,error", [
    (["model.clip_value=0.02"], [0.02], ""),  # a single run is checked whole
    (["-m", "model.clip_value=0.01,-1"], [], ""),  # a sweep is only composed: each job checks itself as it starts
    (["--cfg", "job", "model.clip_value=-1"], [], ""), (["-h"], [], ""),  # Hydra prints, runs nothing
    (["-cp", "/elsewhere", "model.clip_value=-1"], [], ""),  # Hydra composes another conf/: each job checks itself
    (["--multirun", "-cn=train", "model.clip_value=0.01,-1"], [], ""), (["-r", "model.clip_value=0.1"], [0.1], ""),
    (["-m", "model.clip_value=1,2", "--config-name", "nope"], [], "Cannot find primary config 'nope'"),
    (["+x=1"], [0.01], "x: not a key of the training config"), (["~nope"], [], "Could not delete from config. 'nope'"),
    (["model.clip_value=-1"], [-1.0], "model.clip_value=-1.0: expected a number >= 0"),
    (["model.clip_value=big"], [], "model.clip_value=big: Value 'big' of type 'str' could not be converted to Float"),
    (["model.g_batchnorm=maybe"], [], "model.g_batchnorm=maybe: Value 'maybe' is not a valid bool"),
    (["data.root=[1,2]"], [], "data.root=[1,2]: Cannot convert 'list' to string"),
    (["model.nope=1"], [], "Could not override 'model.nope'"),
    (["data=nope"], [], "In 'train': Could not find 'data/nope' (available: celeba, fashion_mnist, folder)"),
    (["trainer.limit_trian_batches=2"], [0.01], "trainer.limit_trian_batches=2: expected an argument of"),
    (["trainer=gpu"] if not GPU else ["trainer.max_time=soon"], [0.01], "trainer."),
    (["--multi", "a=1"], [], "'--multi': not an option of Hydra; write key=value overrides"),
    (["a=1", "-cn"], [], "-cn: expected a value after it"),
    (["-m", "model.n_critic=2,abc"], [], "in sweep job model.n_critic=abc: model.n_critic=abc: Value 'abc' of type"),
    (["-m", "model.n_critic=range(1,3)", "model.nope=1"], [], "Could not override 'model.nope'"),
    (["-m", "model.lr_d=interval(1e-5,1e-4)"], [],
     "'model.lr_d=interval(1e-5,1e-4)': Hydra's basic sweeper runs lists (a,b,c), choice(...) and range(...) only"),
    (["-m", "hydra/sweeper=nope", "model.lr_d=interval(1e-5,1e-4)"], [], "In 'hydra/config': Could not find 'hydra/"),
    # a sweeper that samples values (Optuna's) chooses its jobs as it runs: each checks itself as it starts
    *[(["-m", "hydra/sweeper=optuna", "model.lr_d=interval(1e-5,1e-4)"], [], "")] * OPTUNA,
])
def test_the_train_command_line_is_checked_before_hydra_runs_and_bad_input_is_one_line(tmp_path, monkeypatch, capsys,
                                                                                       argv, checked, error):
    monkeypatch.chdir(tmp_path)
    seen: list[float] = []
    check = lambda cfg: seen.append(cfg.model.clip_value) or validate(cfg)  # noqa: E731
    code, _, err = call(lambda args: cli.check_train_command_line(args, check), argv, capsys)
    assert (code, seen, list(tmp_path.iterdir())) == (2 if error else None, checked, []), err
    assert err.startswith(f"Error: {error}") and len(err.splitlines()) == 1 if error else err == "", err
    assert "HYDRA_FULL_ERROR" not in err and "Traceback" not in err


@pytest.mark.slow
def test_the_command_line_rejects_bad_input_in_one_line_before_writing_anything(tmp_path):
    proc = run_cli(["-m", "wgan_lit.train", "model.n_critic=abc"], cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode == 2 and list(tmp_path.iterdir()) == [], proc.stderr
    assert proc.stderr == "Error: model.n_critic=abc: Value 'abc' of type 'str' could not be converted to Integer\n"


@pytest.mark.slow
def test_a_sweep_job_with_a_bad_value_fails_alone_in_one_line_and_the_other_job_trains(tmp_path):
    data = write_fake_fashion_mnist(tmp_path / "fmnist", n_train=128)
    proc = run_cli(["-m", "wgan_lit.train", "-m", "model.clip_value=0.01,-1", "trainer=cpu", f"data.root={data}",
                    "max_gen_steps=2", f"hydra.sweep.dir={tmp_path}/sweep", *TINY_ARGS], cwd=tmp_path, check=False)
    bad, err = "Error: model.clip_value=-1.0: expected a number >= 0", proc.stderr
    assert proc.returncode != 0 and (tmp_path / "sweep/0/checkpoints/last.ckpt").is_file(), err[-3000:]  # 0 trained
    assert not (tmp_path / "sweep/1/checkpoints").exists() and "Traceback" not in err  # 1 stopped at its check
    # its own log line, and Hydra's report after the sweep, which says it had a failed job (the exit code)
    assert len([line for line in err.splitlines() if bad in line]) == 2, err[-3000:]
    assert "Error executing job with overrides: ['model.clip_value=-1'" in err and "SweepJobError" not in err
    assert bad in (tmp_path / "sweep/1/train.log").read_text()
