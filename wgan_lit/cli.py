"""The one command-line grammar of every wgan_lit command: Hydra's ``key=value`` overrides.

``train`` is a Hydra app; ``generate``, ``evaluate`` and ``timelapse`` compose their dataclass schema through
the same Hydra API, so all four accept the same overrides, list their keys with ``--help``, and report any bad
input as one ``Error: ...`` line with exit code 2 before they start work or write a file. A command that reads one
path (a checkpoint, a run directory) also takes that path alone, for its ``key=PATH``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
T = TypeVar("T")


def fail(message: str) -> NoReturn:
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(2)


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


def compose_or_exit(config_name: str, overrides: Sequence[str]) -> DictConfig:
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        fail(describe(err))


def check_train_command_line(argv: Sequence[str], check: Callable[[DictConfig], Any],
                             errors: tuple[type[Exception], ...] = (ValueError,)) -> None:
    """Compose the training config of ``argv`` (every job of a ``-m`` sweep) and ``check`` it before Hydra runs,
    so that nothing is written for a command line that cannot train; ``errors`` are reported in one line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(list(argv))
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return  # Hydra prints something and runs nothing
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except HydraException as err:
        fail(describe(err))
    if args.multirun:
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, max_batch_size=None) for job in batch]
    else:
        jobs = [list(args.overrides)]
    for job in jobs:
        cfg = compose_or_exit(args.config_name or "train", job)
        try:
            check(cfg)
        except errors as err:
            fail(f"{err}" if len(jobs) == 1 else f"in sweep job {' '.join(job)}: {err}")


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
