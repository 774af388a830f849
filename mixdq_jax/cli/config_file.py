"""``--config FILE``: a command's options from a YAML (or JSON) file, and where each came from.

A file holds a mapping of the command's long option names to values::

    # recipe.yaml: mixdq quantize --config recipe.yaml [--target W8A8 ...]
    model: testbed
    target: W4A8
    run: runs/w4a8
    num-calib: 16          # or num_calib: dashes and underscores are the same key
    overwrite: true        # a flag
    recon-blocks: [down_blocks.1, mid_block]

Values go through the same converters and choices as on the command line (so a range check
applies and a bad value names the file, the key and what is allowed); a flag takes true/false,
an option of several values a list, ``null`` leaves the default. Options given on the command
line override the file's. Paths are relative to the current directory, as on the command line
(not to the file's folder). A settings file written by `write_run_settings` is a config too:
its ``settings`` are used, so ``--config RUN/settings.json`` repeats a recorded run.

A command opts in by calling `add_config_option` in its ``register``; `parse_args` (what
`mixdq_jax.cli.main` calls) merges file and command line and attaches a `Settings` record to
the namespace; `write_run_settings` and `write_settings` write it out (every option's final
value and its source: ``default``, ``file`` or ``command line``). Any problem with the file is a
usage error: the command's ``error: ...`` line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from mixdq_jax.cli import model_args
from mixdq_jax.io_utils import atomic_write_json, read_text

SETTINGS_FILE = "settings.json"  # in the run directory (RUN/settings.json)
EXPORT_SETTINGS_FILE = "mixdq_settings.json"  # in an exported folder
FORMAT = "mixdq-settings"
SOURCE_DEFAULT, SOURCE_FILE, SOURCE_COMMAND_LINE = "default", "file", "command line"
_ATTR = "_mixdq_settings"  # the namespace attribute holding the `Settings` record
_NOT_SETTINGS = frozenset({"help", "config", "debug"})  # options that are no setting
CONFIG_HELP = (
    "YAML or JSON file of options: keys are the long option names (num-calib or num_calib), "
    "values as on the command line (flags true/false, lists for several values); options "
    "given on the command line override it; relative paths are relative to the current "
    "directory, as on the command line. The merged settings are written to the run directory "
    f"({SETTINGS_FILE})"
)


class _Unset:
    def __repr__(self) -> str:
        return "<not given>"


_UNSET = _Unset()


def add_config_option(parser: argparse.ArgumentParser | Any, help_text: str = CONFIG_HELP) -> None:
    """Opt a command into ``--config FILE`` (``parser``: its parser or an argument group)."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help=help_text)


# ------------------------------------------------------------------------------ options
@dataclass(frozen=True)
class _Option:
    """One long option as a file key: its action and how its value is recorded."""

    key: str  # the long option name without dashes prefix, e.g. "num-calib"
    action: argparse.Action
    negated: bool = False  # the --no-x of a BooleanOptionalAction

    @property
    def dest(self) -> str:
        return self.action.dest


def _options(parser: argparse.ArgumentParser) -> dict[str, _Option]:
    """Every long option of ``parser`` by its normalised name (underscores as dashes)."""
    out: dict[str, _Option] = {}
    for action in parser._actions:
        if action.dest in _NOT_SETTINGS or action.dest == argparse.SUPPRESS:
            continue
        for flag in action.option_strings:
            if not flag.startswith("--"):
                continue
            key = flag[2:]
            negated = isinstance(action, argparse.BooleanOptionalAction) and key.startswith("no-")
            out.setdefault(_norm(key), _Option(key=key, action=action, negated=negated))
    return out


def _norm(key: str) -> str:
    return key.replace("_", "-")


def _has_config(parser: argparse.ArgumentParser) -> bool:
    return any(a.dest == "config" and "--config" in a.option_strings for a in parser._actions)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def _is_list(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction | argparse._ExtendAction) or (
        action.nargs not in (None, argparse.OPTIONAL) and not _is_flag(action)
    )


# ------------------------------------------------------------------------------ parsing
def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with a command's ``--config FILE`` merged under its
    command-line options; the namespace of a command that takes ``--config`` carries a
    `Settings` record (`settings_of`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _subparsers(parser)
    # the command is the first word: the top-level options are flags (--debug, -h)
    name = next((a for a in argv if not a.startswith("-")), None)
    sub = commands.get(name) if name is not None else None
    if sub is None or not _has_config(sub) or "-h" in argv or "--help" in argv:
        return _finished(parser.parse_args(argv), sub or parser)
    with _relaxed(sub) as unset:  # which options the command line gives, nothing required
        given_ns = parser.parse_args(argv)
    given = {dest for dest, empty in unset.items() if getattr(given_ns, dest, empty) is not empty}
    config = getattr(given_ns, "config", None)
    config = None if config is _UNSET else config
    values = {} if config is None else load_config(sub, config, name)
    values = _without_overridden(sub, values, given)  # the command line wins
    with _file_defaults(sub, values):
        args = parser.parse_args(argv)
    for dest, value in values.items():
        if dest not in given:  # argparse may re-convert a str default: keep the file's value
            setattr(args, dest, value)
    sources = {}
    for option in _options(sub).values():
        dest = option.dest
        sources[dest] = (
            SOURCE_COMMAND_LINE if dest in given else SOURCE_FILE if dest in values
            else SOURCE_DEFAULT
        )  # fmt: skip
    setattr(args, _ATTR, Settings(command=name, parser=sub, config=config, sources=sources))
    return _finished(args, sub)


def _finished(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """What needs every option's final value: ``--model`` with ``--revision``/``--variant``
    (either may come from the file); a conflict is a usage error."""
    try:
        model_args.finish(args)
    except ValueError as err:
        parser.error(str(err))
    return args


@contextmanager
def _relaxed(parser: argparse.ArgumentParser) -> Iterator[dict[str, Any]]:
    """Nothing required and every default a marker, so a parse tells what was given."""
    saved = []
    unset: dict[str, Any] = {}
    groups = [(g, g.required) for g in parser._mutually_exclusive_groups]
    for group, _ in groups:
        group.required = False
    for action in parser._actions:
        if (
            action.dest == argparse.SUPPRESS or action.default is argparse.SUPPRESS
            or isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        ):  # fmt: skip
            continue
        saved.append((action, action.required, action.default))
        action.required = False
        # append/extend/count start from a copy of the default: None is what they accept
        marker = None if _accumulates(action) else _UNSET
        action.default = marker
        unset[action.dest] = marker
    try:
        yield unset
    finally:
        for action, required, default in saved:
            action.required, action.default = required, default
        for group, required in groups:
            group.required = required


def _accumulates(action: argparse.Action) -> bool:
    return isinstance(action, argparse._AppendAction | argparse._ExtendAction
                      | argparse._AppendConstAction | argparse._CountAction)  # fmt: skip


@contextmanager
def _file_defaults(parser: argparse.ArgumentParser, values: dict[str, Any]) -> Iterator[None]:
    """The file's values as the options' defaults; a required option the file gives is no
    longer required on the command line."""
    saved = []
    groups = [(g, g.required) for g in parser._mutually_exclusive_groups
              if any(a.dest in values for a in g._group_actions)]  # fmt: skip
    for group, _ in groups:
        group.required = False
    for action in parser._actions:
        if action.dest in values and action.option_strings:
            saved.append((action, action.required, action.default))
            action.required = False
            action.default = values[action.dest]
    try:
        yield
    finally:
        for action, required, default in saved:
            action.required, action.default = required, default
        for group, required in groups:
            group.required = required


def _without_overridden(
    parser: argparse.ArgumentParser, values: dict[str, Any], given: set[str]
) -> dict[str, Any]:
    """The file's values less those the command line gives, or options exclusive with one
    it gives (a list option given on the command line replaces the file's list)."""
    drop = set(given)
    for group in parser._mutually_exclusive_groups:
        dests = {a.dest for a in group._group_actions}
        if dests & given:
            drop |= dests - given
    return {k: v for k, v in values.items() if k not in drop}


# ------------------------------------------------------------------------------ the file
def load_config(
    parser: argparse.ArgumentParser, path: str | os.PathLike, command: str | None = None
) -> dict[str, Any]:
    """The options of a config file as ``{dest: value}``, typed and checked as the command
    line types and checks them; any problem is ``parser.error`` naming the file (exit 2)."""
    path = Path(path)
    where = f"--config {path}"

    def fail(message: str) -> NoReturn:
        parser.error(f"{where}: {message}")

    try:
        text = read_text(path, "--config")
    except FileNotFoundError:
        fail("no such file")
    except IsADirectoryError:
        fail("a folder, not a file")
    except ValueError as err:  # not UTF-8: read_text names the file and the line
        parser.error(str(err))
    except OSError as err:
        fail(f"cannot read it ({err})")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        fail(f"not valid JSON (line {err.lineno}: {err.msg})")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        fail(f"not valid YAML ({line}{getattr(err, 'problem', None) or err})")
    if isinstance(data, dict) and data.get("format") == FORMAT:  # a written settings file
        if command is not None and data.get("command") != command:
            fail(f"settings of `mixdq {data.get('command')}`, not of `mixdq {command}`")
        data = data.get("settings")
    if data is None:
        return {}
    if not isinstance(data, dict):
        example = "e.g. `target: W4A8`"
        fail(f"expected a mapping of option names to values ({example}), got {_kind(data)}")
    options = _options(parser)
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            fail(f"key {key!r}: option names are text, e.g. num-calib")
        option = options.get(_norm(key))
        if option is None:
            fail(_unknown(key, options, parser))
        if option.dest in keys:
            fail(f"keys {keys[option.dest]!r} and {key!r} set the same option")
        keys[option.dest] = key
        if value is None:  # null: the default
            continue
        try:
            values[option.dest] = _convert(option, value)
        except _BadValue as err:
            fail(f"{key}: {err}")
    for group in parser._mutually_exclusive_groups:
        both = [keys[a.dest] for a in group._group_actions if a.dest in values]
        if len(both) > 1:
            fail(f"{' and '.join(repr(k) for k in both)} cannot be used together")
    return values


def _unknown(key: str, options: dict[str, _Option], parser: argparse.ArgumentParser) -> str:
    norm = _norm(key)
    if norm in _NOT_SETTINGS:
        return f"{key!r} cannot be set in a config file"
    names = sorted({o.key for o in options.values()})
    close = difflib.get_close_matches(norm, names, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; `{parser.prog} --help` lists them"
    return f"unknown option {key!r}{hint}"


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    return f"{type(value).__name__} {value!r}"


class _BadValue(Exception):
    pass


def _convert(option: _Option, value: Any) -> Any:
    """A file value as argparse would store it for ``option``."""
    action = option.action
    if _is_flag(action):
        if isinstance(action, argparse._CountAction):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _BadValue(f"expected a count (0, 1, 2, ...), got {_kind(value)}")
            return value
        if not isinstance(value, bool):
            raise _BadValue(f"a flag: expected true or false, got {_kind(value)}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return value != option.negated
        if isinstance(action, argparse._StoreConstAction):  # store_true/false/const
            return action.const if value else action.default
        raise _BadValue("this option cannot be set in a config file")
    if _is_list(action):
        items = value if isinstance(value, list) else [value]
        if action.nargs == argparse.ONE_OR_MORE and not items:
            if not action.default:  # nothing, as the default (a recorded settings file)
                return action.default
            raise _BadValue("expected at least one value, got an empty list")
        if isinstance(action.nargs, int) and len(items) != action.nargs:
            raise _BadValue(f"expected {action.nargs} values, got {len(items)}")
        return [_scalar(action, item) for item in items]
    return _scalar(action, value)


def _scalar(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, list | dict):
        raise _BadValue(f"expected one value, got {_kind(value)}")
    if isinstance(value, bool):  # YAML reads yes/no/on/off as booleans too
        raise _BadValue(
            f"expected a value, got {str(value).lower()} (quote it if you mean the text)"
        )
    text = value if isinstance(value, str) else str(value)
    converted: Any = text
    if action.type is not None:
        try:
            converted = action.type(text)
        except argparse.ArgumentTypeError as err:
            raise _BadValue(str(err)) from None
        except (TypeError, ValueError):
            name = getattr(action.type, "__name__", repr(action.type))
            raise _BadValue(f"invalid {name} value: {text!r}") from None
    if action.choices is not None and converted not in action.choices:
        allowed = ", ".join(str(c) for c in action.choices)
        raise _BadValue(f"invalid choice {text!r} (choose from {allowed})")
    return converted


# ------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Settings:
    """Where a parsed command's options came from (attached to its namespace)."""

    command: str
    parser: argparse.ArgumentParser = field(repr=False, compare=False)
    config: Path | None
    sources: dict[str, str]  # dest -> default | file | command line

    def record(self, args: argparse.Namespace) -> dict[str, Any]:
        """Every option's final value (JSON-able, as a config file takes it, by long option
        name) and its source."""
        settings, sources, seen = {}, {}, set()
        for option in _options(self.parser).values():
            if option.negated or id(option.action) in seen:  # one entry per option
                continue
            seen.add(id(option.action))
            action = option.action
            value = getattr(args, option.dest, None)
            if _is_flag(action) and isinstance(action, argparse._StoreConstAction):
                value = value == action.const  # --no-bos-aware: true when given
            settings[option.key] = jsonable(value)
            sources[option.key] = self.sources.get(option.dest, SOURCE_DEFAULT)
        return {
            "format": FORMAT,
            "command": self.command,
            "config": None if self.config is None else str(self.config),
            "cwd": os.getcwd(),
            "settings": settings,
            "sources": sources,
            "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }


def settings_of(args: argparse.Namespace) -> Settings | None:
    """The `Settings` record `parse_args` attached (``None``: parsed some other way)."""
    return getattr(args, _ATTR, None)


def jsonable(value: Any) -> Any:
    """An option's value as JSON, in the form a config file takes it back."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    name = getattr(value, "name", None)  # a parsed target (W4A8), a method: its name
    return name if isinstance(name, str) else str(value)


def write_settings(path: str | os.PathLike, args: argparse.Namespace) -> Path | None:
    """Write ``args``' merged settings and sources to ``path`` (atomically); ``None`` when the
    namespace carries no `Settings` (not parsed by `parse_args`)."""
    settings = settings_of(args)
    if settings is None:
        return None
    return atomic_write_json(path, settings.record(args))


def write_run_settings(run: str | os.PathLike, args: argparse.Namespace) -> Path | None:
    """``RUN/settings.json``: this invocation's settings. One run directory serves several
    invocations (other targets or methods, ``--stop-after`` then a resume): an earlier
    invocation with other settings moves into ``history`` (oldest first); a rerun with the
    same settings (a resume) only refreshes the record."""
    settings = settings_of(args)
    if settings is None:
        return None
    path = Path(run) / SETTINGS_FILE
    record = settings.record(args)
    history: list[Any] = []
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(old, dict) and old.get("format") == FORMAT):
                raise ValueError("not a settings file written by mixdq")
        except (OSError, UnicodeDecodeError, ValueError) as err:
            warnings.warn(f"{path}: replaced, it was unreadable ({err})", stacklevel=2)
        else:
            history = list(old.pop("history", None) or [])
            same = (old.get("command"), old.get("settings")) == (
                record["command"], record["settings"],
            )  # fmt: skip
            if not same:
                history.append(old)
    return atomic_write_json(path, {**record, "history": history})


__all__ = [
    "CONFIG_HELP",
    "EXPORT_SETTINGS_FILE",
    "SETTINGS_FILE",
    "Settings",
    "add_config_option",
    "jsonable",
    "load_config",
    "parse_args",
    "settings_of",
    "write_run_settings",
    "write_settings",
]
