"""One writer per run directory or output folder: a second command fails at once, naming
the holder and the lock file; a lock dies with its process, so a killed run never blocks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from mixdq_jax.io_utils import LOCK_FILE, LockError, exclusive_lock
from tests.cli.conftest import ROOT, failed, fingerprint, mixdq

HOLD = """
import sys, time
from mixdq_jax.io_utils import exclusive_lock
with exclusive_lock(sys.argv[1], "run directory"):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path / "run"``; yields (process, folder)."""
    folder = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield proc, folder
    proc.kill()
    proc.wait()


def test_a_second_writer_fails_naming_the_holder(holder):
    proc, folder = holder
    with pytest.raises(LockError) as info:
        with exclusive_lock(folder, "run directory"):
            pass
    message = str(info.value)
    assert f"pid {proc.pid}" in message and str(folder / LOCK_FILE) in message
    assert "run directory" in message and f"-c {folder}" in message  # the holder's argv


def test_a_killed_holder_does_not_block(holder):
    proc, folder = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (folder / LOCK_FILE).is_file()  # left behind by the dead process
    with exclusive_lock(folder, "run directory"):
        info = json.loads((folder / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid()
    assert not (folder / LOCK_FILE).exists()


def test_lock_is_released_reentrant_and_leaves_nothing(tmp_path):
    folder = tmp_path / "new"
    with exclusive_lock(folder, "output folder"):
        with exclusive_lock(folder, "output folder"):  # nested in one process: fine
            assert (folder / LOCK_FILE).is_file()
    assert not folder.exists()  # created for the command, left empty: removed
    (tmp_path / "kept").mkdir()
    with exclusive_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "result.txt").write_text("x")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["result.txt"]


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "--num-prompts", "1", "--run", "{run}"],
        ["generate", "--prompt", "a red circle", "--out", "{run}"],
        ["export", "--weight-bits", "8", "--out", "{run}"],
        ["evaluate", "--num", "1", "--out", "{run}"],  # the testbed evaluation locks too
    ],
)
def test_commands_refuse_a_folder_in_use(holder, argv):
    proc, folder = holder
    (folder / "notes.txt").write_text("the user's")
    before = fingerprint(folder)
    argv = [a.replace("{run}", str(folder)) for a in argv]
    failed(mixdq(*argv), 2, "in use", f"pid {proc.pid}", str(folder / LOCK_FILE))
    assert fingerprint(folder) == before
