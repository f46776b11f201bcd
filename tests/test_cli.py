"""cli.py: the one key=value grammar of every command, its --help and its one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from omegaconf import MISSING

from wgan_lit import cli


@dataclass
class Tool:
    path: str = MISSING  # required
    n: int = 3
    sizes: list[int] = field(default_factory=list)


def parse(argv: list[str], capsys, check=lambda t: [], path_key=None) -> tuple[object, str, int]:
    try:
        return cli.parse(Tool, argv, prog="wgan_lit.tool", doc="A tool.", check=check, path_key=path_key), "", 0
    except SystemExit as stop:
        return None, capsys.readouterr().err, stop.code


def test_key_value_overrides_fill_the_schema(capsys):
    tool, _, _ = parse(["path=x.ckpt", "n=5", "sizes=[1,2]"], capsys)
    assert tool == Tool(path="x.ckpt", n=5, sizes=[1, 2])
    assert parse(["path=y"], capsys)[0] == Tool(path="y")  # defaults from the dataclass


def test_help_lists_every_key_and_its_default(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.parse(Tool, ["--help"], prog="wgan_lit.tool", doc="A tool.")
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert out.startswith("usage: python -m wgan_lit.tool key=value") and "A tool." in out
    assert "  path=???  required" in out and "  n=3\n" in out and "  sizes=[]\n" in out


@pytest.mark.parametrize("argv,message", [
    (["path=x", "n=abc"], "n=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    (["path=x", "nope=1"], "Could not override 'nope'"),
    (["path=x", "+nope=1"], "nope: not a key of this command"),
    (["n=4"], "path is required: write path=VALUE"),
    (["path=x", "n"], "'n': expected key=value"),
])
def test_bad_input_is_one_error_line_with_exit_code_2(capsys, argv, message):
    tool, err, code = parse(argv, capsys)
    assert tool is None and code == 2
    assert err.startswith("Error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert "HYDRA_FULL_ERROR" not in err


def test_the_value_check_reports_through_the_same_channel(capsys):
    check = lambda t: [f"n={t.n}: expected an integer >= 4"] if t.n < 4 else []  # noqa: E731
    assert parse(["path=x"], capsys, check)[2] == 2
    assert parse(["path=x", "n=4"], capsys, check)[0] == Tool(path="x", n=4)  # control


# ---- a path alone, for the command's path key --------------------------------------------------------------

PATH_KEY = ("path", "a checkpoint")


def test_a_lone_existing_path_is_the_path_key(tmp_path, capsys):
    odd = tmp_path / "run (1),[x]" / "last.ckpt"  # commas and brackets: Hydra's grammar would read them
    odd.parent.mkdir()
    odd.touch()
    assert parse([str(odd), "n=5"], capsys, path_key=PATH_KEY)[0] == Tool(path=str(odd), n=5)
    assert parse(["n=5", str(odd)], capsys, path_key=PATH_KEY)[0] == Tool(path=str(odd), n=5)  # anywhere
    plain = tmp_path / "x.ckpt"
    plain.touch()
    assert parse([str(plain)], capsys, path_key=PATH_KEY)[0] == parse([f"path={plain}"], capsys)[0]
    # control: a command without a path key keeps key=value only
    assert parse([str(plain)], capsys)[1:] == (f"Error: '{plain}': expected key=value (--help lists the keys)\n", 2)


@pytest.mark.parametrize("argv,message", [
    (["foo.ckpt"], "'foo.ckpt': expected key=value, and no such path exists; to read a checkpoint write: "
                   "python -m wgan_lit.tool path=foo.ckpt"),
    (["EXISTS", "foo.ckpt"], "'foo.ckpt': expected key=value, and no such path exists; to read a checkpoint "
                             "write: python -m wgan_lit.tool path=foo.ckpt"),
    (["EXISTS", "EXISTS"], "'EXISTS': expected key=value; to read a checkpoint write: "
                           "python -m wgan_lit.tool path=EXISTS"),
    (["path=EXISTS", "EXISTS"], "'EXISTS': expected key=value; to read a checkpoint write: "
                                "python -m wgan_lit.tool path=EXISTS"),
    (["EXISTS", "n"], "'n': expected key=value: write n=VALUE (--help lists the keys)"),
    (["EXISTS", "--n"], "'--n': expected key=value (--help lists the keys)"),
])
def test_any_other_bare_argument_is_one_error_line_showing_the_key(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)  # foo.ckpt: no such path
    path = tmp_path / "x.ckpt"
    path.touch()
    tool, err, code = parse([a.replace("EXISTS", str(path)) for a in argv], capsys, path_key=PATH_KEY)
    assert tool is None and code == 2
    assert err == f"Error: {message.replace('EXISTS', str(path))}\n"


def test_help_shows_the_path_alone(capsys):
    with pytest.raises(SystemExit):
        cli.parse(Tool, ["--help"], prog="wgan_lit.tool", doc="A tool.", path_key=PATH_KEY)
    assert "python -m wgan_lit.tool PATH [key=value ...]   (PATH alone = path=PATH)" in capsys.readouterr().out


# ---- the training command line: Hydra's options apart from the overrides, sweeps ----------------------------


@pytest.mark.parametrize("argv,expected", [
    (["a=1", "b=2"], dict(overrides=["a=1", "b=2"])),
    (["-m", "a=1,2", "--config-name", "other"], dict(overrides=["a=1,2"], multirun=True, config_name="other")),
    (["--multirun", "-cn=other", "a=1"], dict(overrides=["a=1"], multirun=True, config_name="other")),
    (["a=1", "--cfg", "job"], dict(overrides=["a=1"], prints_only=True)),
    (["-h"], dict(overrides=[], prints_only=True)),
    (["-cp", "/elsewhere", "a=1"], dict(overrides=["a=1"], other_config_dir=True)),
    (["-r", "+x=1", "~y"], dict(overrides=["+x=1", "~y"])),
])
def test_hydra_options_are_told_apart_from_the_overrides(argv, expected):
    assert cli.split_hydra_command_line(argv) == cli.HydraCommandLine(**expected)


@pytest.mark.parametrize("argv,message", [
    (["--multi", "a=1"], "'--multi': not an option of Hydra; write key=value overrides"),
    (["a=1", "-cn"], "-cn: expected a value after it"),
])
def test_an_option_hydra_does_not_have_is_one_error_line(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        cli.split_hydra_command_line(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"Error: {message}") and len(err.splitlines()) == 1, err


def check_train(argv: list[str], capsys) -> tuple[list[str], str, int]:
    """``check_train_command_line`` with a check that notes the model.clip_value of each config it is given."""
    seen: list[str] = []

    def check(cfg):
        seen.append(str(cfg.model.clip_value))
        if cfg.model.clip_value < 0:
            raise ValueError(f"model.clip_value={cfg.model.clip_value}: expected a number >= 0")

    try:
        cli.check_train_command_line(argv, check)
    except SystemExit as stop:
        return seen, capsys.readouterr().err, stop.code
    return seen, capsys.readouterr().err, 0


def test_a_single_run_is_checked_whole_and_a_sweep_only_composed(capsys):
    assert check_train(["model.clip_value=0.02"], capsys) == (["0.02"], "", 0)
    assert check_train(["model.clip_value=-1"], capsys) == (
        ["-1.0"], "Error: model.clip_value=-1.0: expected a number >= 0\n", 2)
    # a sweep's values are checked by each job as it starts (tests/test_cli.py::test_a_sweep_job_with_a_bad_value_...)
    assert check_train(["-m", "model.clip_value=0.01,-1"], capsys) == ([], "", 0)
    assert check_train(["--cfg", "job", "model.clip_value=-1"], capsys) == ([], "", 0)  # Hydra prints, runs nothing


@pytest.mark.parametrize("argv,message", [
    (["-m", "model.n_critic=2,abc"],
     "in sweep job model.n_critic=abc: model.n_critic=abc: Value 'abc' of type 'str' could not be converted"),
    (["-m", "model.n_critic=range(1,3)", "model.nope=1"], "Could not override 'model.nope'"),
    (["-m", "model.lr_d=interval(1e-5,1e-4)"],
     "'model.lr_d=interval(1e-5,1e-4)': Hydra's basic sweeper runs lists (a,b,c), choice(...) and range(...) only"),
    (["-m", "hydra/sweeper=nope", "model.lr_d=interval(1e-5,1e-4)"], "Could not find 'hydra/sweeper/nope'"),
])
def test_a_sweep_that_cannot_be_composed_is_one_error_line(capsys, argv, message):
    seen, err, code = check_train(argv, capsys)
    assert code == 2 and err.startswith("Error: ") and message in err and len(err.splitlines()) == 1, err
    assert seen == []


@pytest.mark.slow
def test_a_sweep_the_basic_sweeper_cannot_run_is_one_line_without_a_traceback_and_writes_nothing(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli(["-m", "wgan_lit.train", "-m", "model.lr_d=interval(1e-5,1e-4)"], cwd=tmp_path, check=False,
                   timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: 'model.lr_d=interval(1e-5,1e-4)': Hydra's basic sweeper runs lists")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "HydraException" not in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == [], "nothing may be written for a rejected command line"


@pytest.mark.slow
def test_a_sweep_job_with_a_bad_value_fails_alone_in_one_line_and_the_other_job_trains(tmp_path):
    from tests.conftest import TINY_ARGS, run_cli, write_fake_fashion_mnist

    data = write_fake_fashion_mnist(tmp_path / "fmnist", n_train=128)
    proc = run_cli(["-m", "wgan_lit.train", "-m", "model.clip_value=0.01,-1", "trainer=cpu", f"data.root={data}",
                    "max_gen_steps=2", f"hydra.sweep.dir={tmp_path}/sweep", *TINY_ARGS], cwd=tmp_path, check=False)
    assert proc.returncode != 0  # the sweep says it had a failed job
    bad = "Error: model.clip_value=-1.0: expected a number >= 0"
    assert (tmp_path / "sweep/0/checkpoints/last.ckpt").is_file(), proc.stderr[-3000:]  # the good job trained
    assert not (tmp_path / "sweep/1/checkpoints").exists()  # the bad one stopped at its check
    logged = [line for line in proc.stderr.splitlines() if bad in line]
    assert len(logged) == 2, proc.stderr[-3000:]  # the job's own log line, and Hydra's report after the sweep
    assert "Error executing job with overrides: ['model.clip_value=-1'" in proc.stderr
    assert "Traceback" not in proc.stderr and "SweepJobError" not in proc.stderr
    assert bad in (tmp_path / "sweep/1/train.log").read_text()
