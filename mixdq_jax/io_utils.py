"""Atomic file writes, folder and file locks, and reading the user's text files: a killed run
never leaves a half-written result behind, two commands never write one folder (or file) at
once, and a file that does not decode is reported by name and line, not by a codec's message."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Binary file handle whose content appears at ``path`` only if the block completes.

    Writes go to a temp file in the same folder, which is fsynced and renamed over ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and shipped assets are readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` so that ``path`` holds either the old or the complete new content."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------ locks
LOCK_FILE = ".mixdq.lock"
_HELD: set[Path] = set()  # folders this process holds: a nested lock on one is a no-op


class LockError(RuntimeError):
    """Another process is writing the same run directory or output folder."""


def _holder(fd: int) -> str:
    """What a lock file says about its holder (pid, host, command, start), for the error."""
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        who = f"pid {info['pid']} on {info['host']}, started {info['started']}"
        return f"{who}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its details"


def _lock_info() -> bytes:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": shlex.join(sys.argv) if sys.argv else "python",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    return (json.dumps(info) + "\n").encode("utf-8")


@contextmanager
def exclusive_lock(folder: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """Hold ``folder/.mixdq.lock`` while a command writes ``folder`` (created if missing).

    Two commands writing one run directory would interleave files; the second fails at once
    with a :class:`LockError` naming the holder (pid, host, command) and the lock path. The
    lock is ``flock`` on the open file, so the kernel drops it when the holder exits, however it
    dies: a file left by a dead process does not block anyone. The file records the holder for
    that message and is removed on release (as is ``folder`` if this call created it and it is
    still empty). Re-entrant within one process. ``what`` names the folder in the message
    (``"run directory"``, ``"output folder"``).
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with _holding(folder, folder / LOCK_FILE, what):
            yield folder
    finally:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: nothing was written


@contextmanager
def file_lock(path: str | os.PathLike, what: str = "output file") -> Iterator[Path]:
    """Hold a lock for writing the single file ``path`` (``mixdq allocate --out FILE``, ``mixdq
    bench --out``): ``.<name>.mixdq.lock`` beside it, created and removed as `exclusive_lock`
    does, so two commands writing one file fail at once instead of racing. The parent folder
    is created if missing (the file is written there anyway). Re-entrant within one process."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _holding(path, path.parent / f".{path.name}{LOCK_FILE}", what):
        yield path


@contextmanager
def _holding(subject: Path, lock: Path, what: str) -> Iterator[None]:
    """Hold ``lock`` (for writing ``subject``) recording the holder; re-entrant within one
    process; the file is removed on release, before the flock is dropped."""
    key = subject.resolve()
    if key in _HELD:
        yield
        return
    fd = _acquire(lock, what, subject)
    _HELD.add(key)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _lock_info(), 0)
        yield
    finally:
        _HELD.discard(key)
        lock.unlink(missing_ok=True)  # before unlocking: a waiter re-checks the inode
        os.close(fd)  # releases the flock


def _acquire(path: Path, what: str, folder: Path) -> int:
    """An open descriptor of ``path`` holding its flock, or a LockError naming the holder."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockError(
                f"{what} {folder} is in use by another mixdq command ({holder}); wait for it "
                f"to finish or stop it, or use another folder (lock file: {path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:  # the holder we waited on may have removed the file: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


# ------------------------------------------------------------------------------ user files
def _label(path: Path, flag: str | None) -> str:
    return f"{flag} {path}" if flag else str(path)


def read_text(path: str | os.PathLike, flag: str | None = None) -> str:
    """A user's text file as UTF-8 (a leading byte-order mark dropped), or a ``ValueError`` that
    names the option, the file and the line of the first byte that is not UTF-8 (a codec's own
    message names neither). ``flag``: the option that gave the file (``"--prompts-file"``)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{_label(path, flag)}: not UTF-8 text (line {line}: byte "
            f"0x{data[err.start]:02x}); save the file as UTF-8"
        ) from None


def read_json(path: str | os.PathLike, flag: str | None = None, *, what: str = "") -> Any:
    """A user's JSON file, or a ``ValueError`` naming the file and the line and column of the
    syntax error. ``what``: what the file should be, for the message (``"a UNet
    config.json"``)."""
    path = Path(path)
    text = read_text(path, flag)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        expected = f"; expected {what}" if what else ""
        raise ValueError(
            f"{_label(path, flag)}: not valid JSON (line {err.lineno}, column {err.colno}: "
            f"{err.msg}){expected}"
        ) from None


def read_json_object(path: str | os.PathLike, flag: str | None = None, *, what: str) -> dict:
    """A user's JSON file that must hold one object (``{...}``): anything else is a
    ``ValueError`` naming the file and what it holds instead."""
    data = read_json(path, flag, what=what)
    if not isinstance(data, dict):
        kinds = {list: "a list", str: "a string", bool: "true/false", type(None): "null"}
        kind = kinds.get(type(data), "a number")
        raise ValueError(
            f"{_label(Path(path), flag)}: expected {what} (a JSON object {{...}}), got {kind}"
        )
    return data


__all__ = [
    "LOCK_FILE",
    "LockError",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "exclusive_lock",
    "file_lock",
    "read_json",
    "read_json_object",
    "read_text",
]
