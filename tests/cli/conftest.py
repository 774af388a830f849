"""Run the real ``mixdq`` entry point in a subprocess, and fingerprint folders.

Each test asserts what a user sees: the exit code, a message on stderr that names the thing
(file, tensor, folder, value), no traceback, and that files the user owns are unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixdq_jax.testbed import TESTBED_PATH

ROOT = Path(__file__).resolve().parents[2]
_CACHE: dict[str, str] = {}  # the subprocesses' shared JAX compilation cache (see below)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for every subprocess of the session: a rerun
    (resume) then loads its programs instead of compiling them again (~6 s -> ~1 s)."""
    _CACHE["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax-cache"))
    _CACHE["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield
    _CACHE.clear()


def mixdq(
    *args: str | os.PathLike, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """``python -m mixdq_jax.cli ARGS`` from the repository root; stdout and stderr as text."""
    environ = {k: v for k, v in os.environ.items() if k != "MIXDQ_DEBUG"}
    environ.update(JAX_PLATFORMS="cpu", **_CACHE, **env)
    return subprocess.run(
        [sys.executable, "-m", "mixdq_jax.cli", *map(str, args)],
        cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def in_process(capsys: pytest.CaptureFixture[str], argv) -> tuple[int, str]:
    """``mixdq ARGV`` in this process (the same ``main`` as the entry point, no interpreter
    start): its exit code and stderr, which never holds a traceback."""
    from mixdq_jax import cli  # noqa: PLC0415

    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def failed(proc: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """Assert ``proc`` exited with ``code``, printed no traceback, and named every ``names``
    on stderr; returns stderr."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    for name in names:
        assert name in err, (name, err[-3000:])
    return err


def fingerprint(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file (and link target) under ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def model_copy(tmp_path) -> Path:
    """A private copy of the shipped testbed model (12 MB, diffusers layout) to damage."""
    return Path(shutil.copytree(TESTBED_PATH, tmp_path / "model"))
