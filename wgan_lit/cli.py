"""The one command-line grammar of every wgan_lit command: Hydra's ``key=value`` overrides.

``train`` is a Hydra app; ``generate``, ``evaluate`` and ``timelapse`` compose their dataclass schema through
the same Hydra API, so all four accept the same overrides, list their keys with ``--help``, and report any bad
input as one ``Error: ...`` line with exit code 2 before they start work or write a file. A command that reads one
path (a checkpoint, a run directory) also takes that path alone, for its ``key=PATH``.
"""

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
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
T = TypeVar("T")


def fail(message: str) -> NoReturn:
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
    cause = err.__cause__
    if cause is not None and str(cause):
        # OmegaConf appends "    full_key: ..." detail lines: the override already names the key.
        lines += [line for line in str(cause).splitlines() if line and not line.startswith(" ")][:2]
    return ": ".join(dict.fromkeys(line.strip().rstrip(".") for line in lines))


def compose_or_exit(config_name: str, overrides: Sequence[str], return_hydra_config: bool = False,
                    context: str = "") -> DictConfig:
    """The config of ``overrides``, or exit 2 with one line (after ``context``, e.g. the sweep job it is)."""
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides),
                           return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as err:
        fail(context + describe(err))


# Hydra's own command-line options (those of hydra.main's argument parser, hydra-core 1.3). After these Hydra
# prints something (help, a config, information) or reruns a pickled job: it trains nothing new, nothing to check.
_HYDRA_PRINT_OPTIONS = {"--help", "-h", "--hydra-help", "--version", "--cfg", "-c", "--info", "-i",
                        "--shell-completion", "-sc", "--experimental-rerun"}
_HYDRA_VALUE_OPTIONS = {"--config-name": "-cn", "--config-path": "-cp", "--config-dir": "-cd", "--package": "-p"}
_HYDRA_SWITCHES = {"--multirun", "-m", "--run", "-r", "--resolve"}


@dataclasses.dataclass
class HydraCommandLine:
    """A Hydra app's command line, split: its overrides, and the options of Hydra that the checks need."""

    overrides: list[str]
    multirun: bool = False
    config_name: str = "train"
    prints_only: bool = False  # --help, --cfg, --info, ...: Hydra runs no job
    other_config_dir: bool = False  # --config-path or --config-dir: not the conf/ that compose_or_exit reads


def split_hydra_command_line(argv: Sequence[str]) -> HydraCommandLine:
    """Hydra's options apart from the overrides (every argument not starting with "-"). Options are written in
    full or by their short name, as ``-cn NAME`` or ``-cn=NAME``; an option Hydra does not have fails in one line
    (argparse's abbreviations, such as ``--multi``, are refused: the check would have to guess what Hydra reads)."""
    line = HydraCommandLine(overrides=[])
    long_name = {short: long for long, short in _HYDRA_VALUE_OPTIONS.items()}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("-"):
            line.overrides.append(arg)
            continue
        option, has_value, value = arg.partition("=")
        if option in _HYDRA_PRINT_OPTIONS:
            line.prints_only = True  # what follows may be its value (--cfg job): nothing more is checked
            return line
        if option in _HYDRA_SWITCHES and not has_value:
            line.multirun = line.multirun or option in ("--multirun", "-m")
            continue
        option = long_name.get(option, option)
        if option not in _HYDRA_VALUE_OPTIONS:
            fail(f"{arg!r}: not an option of Hydra; write key=value overrides (--help lists the keys)")
        if not has_value:
            if not args:
                fail(f"{arg}: expected a value after it")
            value = args.pop(0)
        if option == "--config-name":
            line.config_name = value
        elif option in ("--config-path", "--config-dir"):
            line.other_config_dir = True
    return line


def sweep_jobs(overrides: Sequence[str], parsed: Sequence[Override]) -> list[list[str]] | None:
    """The jobs of Hydra's basic sweeper for these overrides, as it makes them (the product of the sweep values,
    a later value of a key replacing an earlier one), or None where they cannot be listed without Hydra's config
    loader (``glob(...)`` over the options of a config group). A sweep it does not run fails in one line."""
    values: dict[str, list[str]] = {}
    for text, override in zip(overrides, parsed, strict=True):
        key = override.get_key_element()
        if not override.is_sweep_override():
            values[key] = [text]  # as written: Hydra's string of a deletion (~key) would read "null"
        elif override.value_type == ValueType.GLOB_CHOICE_SWEEP:
            return None
        elif override.is_discrete_sweep():
            values[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:  # interval(...): Hydra's basic sweeper raises its HydraException with a traceback after it
            fail(f"{text!r}: Hydra's basic sweeper runs lists (a,b,c), choice(...) and range(...) only; "
                 "interval(...) needs a sweeper that samples values (e.g. hydra/sweeper=optuna, "
                 "pip install hydra-optuna-sweeper)")
    return [list(job) for job in itertools.product(*values.values())]


def check_train_command_line(argv: Sequence[str], check: Callable[[DictConfig], Any],
                             errors: tuple[type[Exception], ...] = (ValueError,)) -> None:
    """Check the training command line ``argv`` before Hydra runs, so that one that cannot train writes nothing:
    a single run is composed and ``check``ed (``errors`` are reported in one line, exit code 2).

    A ``-m`` sweep is only composed here: its overrides, and each of its jobs where the sweeper is Hydra's basic
    one, which makes the jobs of its lists before it writes the sweep directory. Values are checked by each job as
    it starts (``wgan_lit.train._main``), so that a job with a bad value fails alone and the others train; another
    sweeper (Optuna's) chooses its jobs as it goes."""
    line = split_hydra_command_line(argv)
    if line.prints_only or line.other_config_dir:
        return  # another config directory: Hydra composes it, and each job checks its values as it starts
    try:
        parsed = OverridesParser.create().parse_overrides(line.overrides)
    except HydraException as err:
        fail(describe(err))
    if not line.multirun:
        cfg = compose_or_exit(line.config_name, line.overrides)
        try:
            check(cfg)
        except errors as err:
            fail(str(err))
        return
    fixed = [text for text, override in zip(line.overrides, parsed, strict=True) if not override.is_sweep_override()]
    hydra_cfg = compose_or_exit(line.config_name, fixed, return_hydra_config=True).hydra
    if hydra_cfg.runtime.choices.get("hydra/sweeper") != "basic":
        return
    # The sweeper's own params (hydra.sweeper.params) come first, as in BasicSweeper.sweep.
    params = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()]
    overrides = [*params, *line.overrides]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        fail(describe(err))
    for job in sweep_jobs(overrides, parsed) or []:
        compose_or_exit(line.config_name, job, context=f"in sweep job {' '.join(job)}: ")


def parse(schema: type[T], argv: Sequence[str], prog: str, doc: str,
          check: Callable[[T], list[str]] = lambda _: [], path_key: tuple[str, str] | None = None) -> T:
    """``argv`` (``key=value`` overrides) over the dataclass ``schema``; ``--help`` prints ``doc`` and the keys.

    ``path_key`` is (key, what it names), e.g. ("checkpoint", "a checkpoint"): then one bare argument that is an
    existing path stands for ``key=PATH``."""
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        keys = "\n".join(help_lines(schema, OmegaConf.structured(schema)))
        usage = f"usage: python -m {prog} key=value [key=value ...]"
        if path_key:
            usage += f"\n       python -m {prog} PATH [key=value ...]   (PATH alone = {path_key[0]}=PATH)"
        print(f"{usage}\n\n{doc.strip()}\n\nKeys (=default):\n{keys}")
        sys.exit(0)
    path = None
    if path_key:
        argv, path = take_path(schema, argv, prog, *path_key)
    name = f"{prog.rsplit('.', 1)[-1]}_schema"
    ConfigStore.instance().store(name=name, node=schema)
    cfg = compose_or_exit(name, argv)
    if path is not None:  # set, not overridden: Hydra's grammar would read commas, brackets or quotes in it
        cfg[path_key[0]] = path
    unknown = unknown_keys(schema, cfg)
    if unknown:  # "+key=value" adds a key Hydra does not check against the schema
        fail(f"{unknown[0]}: not a key of this command (--help lists the keys)")
    try:
        obj = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        fail(f"{err.full_key} is required: write {err.full_key}=VALUE (--help lists the keys)")
    except OmegaConfBaseException as err:
        fail(f"{err.full_key}: {str(err).splitlines()[0]} (--help lists the keys)")
    bad = check(obj)
    if bad:
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


def unknown_keys(schema: type, node: DictConfig, prefix: str = "") -> list[str]:
    types = typing.get_type_hints(schema)
    out = [f"{prefix}{k}" for k in node if k not in types]
    for name, kind in types.items():
        if dataclasses.is_dataclass(kind) and name in node:
            out += unknown_keys(kind, node[name], f"{prefix}{name}.")
    return out


def help_lines(schema: type, node: DictConfig, prefix: str = "") -> list[str]:
    """``  key=default  comment`` for every field, nested dataclasses as dotted keys; comments from the source."""
    comments = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(schema), re.M))
    types = typing.get_type_hints(schema)
    lines = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(types[f.name]):
            lines += help_lines(types[f.name], node[f.name], f"{key}.")
            continue
        value = "???" if OmegaConf.is_missing(node, f.name) else node[f.name]
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, ListConfig):
            value = "[" + ",".join(map(str, value)) + "]"
        lines.append(f"  {key}={value}" + (f"  {comments[f.name]}" if f.name in comments else ""))
    return lines
