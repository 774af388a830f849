"""Where a command writes: one policy for every command that writes a folder or a file.

``generate``, ``calibrate``, ``sensitivity``, ``allocate``, ``export``, ``quantize``,
``evaluate``, ``demo`` and ``bench --out`` call `claim` with their targets before any work:

- a folder target that exists as a file (or below a file), or a file target that is a folder,
  is refused naming it (not ``[Errno 17] File exists`` after the model loaded);
- a target equal to or inside a model folder named by ``--model``/``--float-model`` is
  refused: run files would land in the user's model;
- each target is locked (a folder's ``.mixdq.lock``, a file's ``.<name>.mixdq.lock``) for the
  whole command, so a second command on it fails at once naming the holder;
- a folder must be new, empty, or the command's own earlier output (``Target.own`` recognises
  it: a run directory, an earlier evaluation, ...); a file must be new or recognised as the
  command's own. Anything else needs ``--overwrite`` and is refused, before any work, with a
  message naming the files that are there. With ``--overwrite`` a command replaces only the
  files it writes; it never deletes the user's other files.

Files that are inputs of the same command (``--config``, ``--prompts`` ...) do not make a
folder "not empty": keeping a recipe next to its run is fine.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from mixdq_jax.io_utils import LOCK_FILE, exclusive_lock, file_lock
from mixdq_jax.rundir import is_run_directory

_MODEL_FLAGS = (("--model", "model"), ("--float-model", "float_model"))
_SHOWN = 5  # files named in a refusal


@dataclass(frozen=True, kw_only=True)
class Target:
    """One place a command writes.

    ``own``: whether an existing target is the command's own earlier output (then it is
    written without ``--overwrite``); ``None`` for a folder whose contents the command checks
    itself (an export folder: `mixdq_jax.deploy.checkpoint.check_export_folder`). ``writes``:
    names the command writes at the top of a folder, named first in a refusal."""

    flag: str
    path: Path
    what: str
    file: bool = False
    own: Callable[[Path], bool] | None = None
    writes: tuple[str, ...] = ()


def run_directory(flag: str, path: Path) -> Target:
    """A run directory (``--run``; ``mixdq demo --out``): shared by the commands of a run."""
    return Target(flag=flag, path=Path(path), what="run directory", own=is_run_directory)


def output_folder(
    flag: str, path: Path, own: Callable[[Path], bool] | None, writes: tuple[str, ...] = ()
) -> Target:
    return Target(flag=flag, path=Path(path), what="output folder", own=own, writes=writes)


def output_file(flag: str, path: Path, own: Callable[[Path], bool] | None = None) -> Target:
    """A single file; ``own=None``: no file can be recognised as the command's own, so an
    existing one is replaced only with ``--overwrite``."""
    return Target(flag=flag, path=Path(path), what="output file", file=True,
                  own=own or _never)  # fmt: skip


def _never(_path: Path) -> bool:
    return False


# ------------------------------------------------------------------------------ recognisers
def read_json_quietly(path: Path) -> object:
    """A JSON file's content, or ``None`` when it is missing or unreadable (a recogniser only
    asks whether a file is ours; it never fails)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------ the policy
@contextmanager
def claim(args: argparse.Namespace, *targets: Target, lock: bool = True) -> Iterator[None]:
    """Check ``targets`` (see the module doc) and hold their locks until the block ends.

    Shape and model checks come first (they create nothing), then the locks, then the
    contents (under the lock, so no other command changes them meanwhile). ``lock=False``:
    checks only (a process of a multi-host run that does not write)."""
    command = f"mixdq {getattr(args, 'command', '') or ''}".strip()
    overwrite = getattr(args, "overwrite", None)  # None: the command has no --overwrite
    models = _model_folders(args)
    for target in targets:
        _check_shape(target)
        _check_outside(target, models)
    with ExitStack() as stack:
        if lock:
            for target in targets:
                if target.file:
                    stack.enter_context(file_lock(target.path, target.what))
                else:
                    stack.enter_context(exclusive_lock(target.path, target.what))
        inputs = _input_files(args, targets)
        for target in targets:
            _check_contents(target, command, overwrite, inputs)
        yield


def _check_shape(target: Target) -> None:
    path = target.path
    where = f"{target.flag} {path}"
    if target.file:
        if path.is_dir():
            raise ValueError(f"{where} is a folder; {target.flag} takes a file name")
    elif path.exists() and not path.is_dir():
        raise ValueError(
            f"{where} is a file, not a folder; give a new folder (or an earlier {target.what})"
        )
    for parent in path.absolute().parents:  # the first existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{where}: {parent} is a file, so the {target.what} cannot be "
                                 "made there; choose another path")  # fmt: skip
            break


def _model_folders(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The local model folders the command reads (a repo id's cached copy is not the user's
    folder, and resolving it may take a download: skipped)."""
    out = []
    for flag, dest in _MODEL_FLAGS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if str(value) == "testbed":
            from mixdq_jax.testbed import TESTBED_PATH  # noqa: PLC0415

            folder = TESTBED_PATH
        else:
            folder = Path(value)
            try:
                if not folder.is_dir():
                    continue
            except OSError:  # a name too long for a path: a repo id
                continue
        out.append((flag, folder.resolve()))
    return out


def _check_outside(target: Target, models: list[tuple[str, Path]]) -> None:
    path = target.path.resolve()
    for flag, model in models:
        if path == model or model in path.parents:
            where = "is the" if path == model else "is inside the"
            raise ValueError(
                f"{target.flag} {target.path} {where} model folder {model} ({flag}): "
                f"the {target.what}'s files would be written into the model; use a folder "
                "outside it"
            )


def _input_files(args: argparse.Namespace, targets: tuple[Target, ...]) -> set[Path]:
    """The existing files the command's options name (inputs), resolved."""
    skip = {t.path.resolve() for t in targets}
    found: set[Path] = set()
    values: list[object] = []
    for value in vars(args).values():
        values.extend(value if isinstance(value, list | tuple) else [value])
    for value in values:
        if not isinstance(value, str | os.PathLike) or value == "":
            continue
        try:
            path = Path(value)
            if path.is_file():
                resolved = path.resolve()
                if resolved not in skip:
                    found.add(resolved)
        except (OSError, ValueError):  # prompt text that is no path
            continue
    return found


def _files(folder: Path, inputs: set[Path], limit: int) -> list[str]:
    """Up to ``limit`` files under ``folder`` (relative paths, sorted per folder) that are not
    the lock or an input of the command; empty folders hold nothing to replace."""
    found: list[str] = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        base = Path(root)
        for name in sorted(names):
            path = base / name
            if name.endswith(LOCK_FILE) or path.resolve() in inputs:  # folder or file locks
                continue
            found.append(path.relative_to(folder).as_posix())
            if len(found) >= limit:
                return found
    return found


def _check_contents(
    target: Target, command: str, overwrite: bool | None, inputs: set[Path]
) -> None:
    if target.own is None or overwrite:
        return
    path = target.path
    how = "" if overwrite is None else ", or --overwrite to write into it (files it does not " \
        "write are kept)"  # fmt: skip
    if target.file:
        if path.exists() and not target.own(path):
            how = "" if overwrite is None else ", or --overwrite to replace it"
            raise ValueError(
                f"{target.flag} {path} already exists and was not written by {command}; "
                f"choose another {target.flag}{how}"
            )
        return
    if not path.is_dir() or target.own(path):
        return
    held = _files(path, inputs, _SHOWN + 1)
    if not held:
        return
    replaced = [n for n in target.writes if (path / n).exists()]
    shown = ", ".join(held[:_SHOWN]) + (", ..." if len(held) > _SHOWN else "")
    detail = f"its {', '.join(replaced)} would be replaced; " if replaced else ""
    ours = "a mixdq run directory" if target.own is is_run_directory else \
        f"an earlier output of {command}"  # fmt: skip
    raise ValueError(
        f"{target.flag} {path} is not empty and not {ours} (it holds {shown}); {detail}use a "
        f"new or empty folder{how}"
    )


__all__ = [
    "Target",
    "claim",
    "is_run_directory",
    "output_file",
    "output_folder",
    "read_json_quietly",
    "run_directory",
]
