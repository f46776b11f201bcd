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
