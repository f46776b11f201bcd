"""The one command-line grammar of every wgan_lit command, Hydra's ``key=value`` overrides, and its one error format:
bad input is one ``Error: ...`` line on stderr and exit code 2, before any work starts or any file is written."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
import shlex
import sys
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, ValueType
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
T = TypeVar("T")


def fail(message: str) -> NoReturn:
    """The one reporter of bad input: ``Error: message`` on stderr, exit code 2."""
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(2)


def problems(rules: Iterable[tuple[str, Any, bool, str]]) -> list[str]:
    """The one error format: ``key=value: expected ...`` for every (key, value, ok, expected) rule that fails."""
    return [f"{key}={value!r}: expected {expected}" for key, value, ok, expected in rules if not ok]


def describe(err: BaseException) -> str:
    """One line from a Hydra or OmegaConf error: what was wrong, without the traceback hint."""
    if isinstance(err, OverrideParseException):
        return f"{err.override!r}: expected key=value (--help lists the keys)"
    if isinstance(err, MissingConfigException) and err.options:
        return f"{str(err).splitlines()[0]} (available: {', '.join(err.options)})"
    lines = [str(err).splitlines()[0].removeprefix("Error merging override ")]
    if err.__cause__ is not None:  # OmegaConf's indented "full_key: ..." lines repeat what the override names
        lines += [line for line in str(err.__cause__).splitlines() if line and not line.startswith(" ")][:2]
    return ": ".join(dict.fromkeys(line.strip().rstrip(".") for line in lines))


def compose_or_exit(config_name: str, overrides: Sequence[str], return_hydra_config: bool = False,
                    context: str = "") -> DictConfig:
    """The config of ``overrides`` composed from conf/, or exit 2 with one line (after ``context``)."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name, list(overrides), return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        fail(context + describe(err))


def _parse_overrides(overrides: Sequence[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        fail(describe(err))


# Hydra's own options (hydra-core 1.3). After one that prints (help, config, info) or reruns a job, nothing trains.
_PRINTS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
           "--experimental-rerun"}
_VALUED = {"-cn": "--config-name", "-cp": "--config-path", "-cd": "--config-dir", "-p": "--package"}
_SWITCHES = {"--multirun", "-m", "--run", "-r", "--resolve"}


@dataclasses.dataclass
class HydraCommandLine:  # a Hydra app's command line: its overrides, and the options of Hydra the checks need
    overrides: list[str]
    multirun: bool = False
    config_name: str = "train"
    prints_only: bool = False  # --help, --cfg, --info, ...: Hydra runs no job
    other_config_dir: bool = False  # --config-path or --config-dir: not the conf/ that compose_or_exit reads


def split_hydra_command_line(argv: Sequence[str]) -> HydraCommandLine:
    """Hydra's options (full or short, ``-cn NAME`` or ``-cn=NAME``) apart from the overrides; any other option fails
    in one line, argparse's abbreviations (``--multi``) too: the check would have to guess what Hydra reads."""
    line, args = HydraCommandLine(overrides=[]), list(argv)
    while args:
        arg = args.pop(0)
        option, has_value, value = arg.partition("=")
        option = _VALUED.get(option, option)
        if not arg.startswith("-"):
            line.overrides.append(arg)
        elif option in _PRINTS:
            line.prints_only = True  # what follows may be its value (--cfg job): nothing more is read
            return line
        elif option in _SWITCHES and not has_value:
            line.multirun |= option in ("--multirun", "-m")
        elif option not in _VALUED.values():
            fail(f"{arg!r}: not an option of Hydra; write key=value overrides (--help lists the keys)")
        elif not has_value and not args:
            fail(f"{arg}: expected a value after it")
        else:
            value = value if has_value else args.pop(0)
            line.config_name = value if option == "--config-name" else line.config_name
            line.other_config_dir |= option in ("--config-path", "--config-dir")
    return line


def sweep_jobs(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of ``overrides``, as it makes them (the product of the sweep values, a
    later value of a key replacing an earlier one); [] where only its config loader can list them (``glob(...)``)."""
    values: dict[str, list[str]] = {}
    for text, override in zip(overrides, _parse_overrides(overrides), strict=True):
        key, sweep = override.get_key_element(), override.is_sweep_override()
        if override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            return []
        if sweep and not override.is_discrete_sweep():  # interval(...): the sweeper would raise, with a traceback
            fail(f"{text!r}: Hydra's basic sweeper runs lists (a,b,c), choice(...) and range(...) only; interval(...) "
                 "needs a sweeper that samples values (e.g. hydra/sweeper=optuna, pip install hydra-optuna-sweeper)")
        # A fixed override as written: Hydra's string of a deletion (~key) would read "null".
        values[key] = [f"{key}={v}" for v in override.sweep_string_iterator()] if sweep else [text]
    return [list(job) for job in itertools.product(*values.values())]


def check_train_command_line(argv: Sequence[str], check: Callable[[DictConfig], Any],
                             errors: tuple[type[Exception], ...] = (ValueError,)) -> None:
    """Check the training command line before Hydra runs, so that one that cannot train writes nothing: a single run
    is composed and ``check``ed (``errors`` are its one line). A ``-m`` sweep is only composed, job by job under the
    basic sweeper (others, such as Optuna's, choose jobs as they go): each job checks its values as it starts."""
    line = split_hydra_command_line(argv)
    if line.prints_only or line.other_config_dir:
        return  # Hydra prints, or composes another conf/: each job checks its values as it starts
    if not line.multirun:
        try:
            check(compose_or_exit(line.config_name, line.overrides))
        except errors as err:
            fail(str(err))
        return
    fixed = [text for text, o in zip(line.overrides, _parse_overrides(line.overrides), strict=True)
             if not o.is_sweep_override()]
    hydra_cfg = compose_or_exit(line.config_name, fixed, return_hydra_config=True).hydra
    if hydra_cfg.runtime.choices.get("hydra/sweeper") == "basic":  # its own params first, as BasicSweeper.sweep
        params = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()]
        for job in sweep_jobs([*params, *line.overrides]):
            compose_or_exit(line.config_name, job, context=f"in sweep job {' '.join(job)}: ")


def parse(schema: type[T], argv: Sequence[str], prog: str, doc: str,
          check: Callable[[T], list[str]] = lambda _: [], path_key: tuple[str, str] | None = None) -> T:
    """``argv`` (``key=value`` overrides) over the dataclass ``schema``; ``--help`` prints ``doc`` and the keys.
    ``path_key``: (key, what it names), e.g. ("checkpoint", "a checkpoint"): one bare existing path is key=PATH."""
    argv = list(argv)
    if "-h" in argv or "--help" in argv:
        usage = f"usage: python -m {prog} key=value [key=value ...]"
        if path_key:
            usage += f"\n       python -m {prog} PATH [key=value ...]   (PATH alone = {path_key[0]}=PATH)"
        print(f"{usage}\n\n{doc.strip()}\n\nKeys (=default):\n" + "\n".join(help_lines(schema)))
        sys.exit(0)
    argv, path = take_path(schema, argv, prog, *path_key) if path_key else (argv, None)
    name = f"{prog.rsplit('.', 1)[-1]}_schema"
    ConfigStore.instance().store(name=name, node=schema)
    cfg = compose_or_exit(name, argv)
    if path is not None:  # set, not overridden: Hydra's grammar would read commas, brackets or quotes in it
        cfg[path_key[0]] = path
    try:  # merged onto the schema: a "+key=value" of Hydra's adds a key the schema does not have
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(cfg)))
    except MissingMandatoryValue as err:
        fail(f"{err.full_key} is required: write {err.full_key}=VALUE (--help lists the keys)")
    except OmegaConfBaseException as err:
        what = "not a key of this command" if isinstance(err, ConfigKeyError) else str(err).splitlines()[0]
        fail(f"{err.full_key}: {what} (--help lists the keys)")
    if bad := check(obj):
        fail("\n".join(bad))
    return obj


def take_path(schema: type, argv: list[str], prog: str, key: str, what: str) -> tuple[list[str], str | None]:
    """``argv`` without its one bare argument when that is an existing path and ``key=`` is not given, and that
    path; any other bare argument fails in one line that shows the ``key=value`` to write."""
    bare = [a for a in argv if "=" not in a and not a.startswith(("-", "+", "~"))]  # options: Hydra's message
    if not bare:
        return argv, None
    given = any(a.split("=", 1)[0].lstrip("+~") == key for a in argv if "=" in a)
    if len(bare) == 1 and not given and Path(bare[0]).exists():
        return [a for a in argv if a != bare[0]], bare[0]
    bad = next((a for a in bare if not Path(a).exists()), bare[-1])
    if not Path(bad).exists() and bad.split(".", 1)[0] in typing.get_type_hints(schema):
        fail(f"{bad!r}: expected key=value: write {bad}=VALUE (--help lists the keys)")  # a key without its value
    reason = "" if Path(bad).exists() else ", and no such path exists"
    fail(f"{bad!r}: expected key=value{reason}; to read {what} write: python -m {prog} {shlex.quote(f'{key}={bad}')}")


def help_lines(schema: type, prefix: str = "") -> list[str]:
    """``  key=default  comment`` for every field, nested dataclasses as dotted keys; comments from the source."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(schema), re.M))
    types, node, lines = typing.get_type_hints(schema), OmegaConf.structured(schema), []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(types[f.name]):
            lines += help_lines(types[f.name], f"{prefix}{f.name}.")
            continue
        value = "???" if OmegaConf.is_missing(node, f.name) else node[f.name]
        if isinstance(value, bool | ListConfig):
            value = str(value).lower() if isinstance(value, bool) else "[" + ",".join(map(str, value)) + "]"
        lines.append(f"  {prefix}{f.name}={value}" + (f"  {comments[f.name]}" if f.name in comments else ""))
    return lines
