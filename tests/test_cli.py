"""The ``mixdq`` entry point: errors, Ctrl-C and a closed pipe end with a message, not a
traceback."""

from __future__ import annotations

import pytest

from mixdq_jax import cli
from mixdq_jax.cli import layers as layers_cli
from tests.reference_data import sdxl_turbo


def _raising(exc):
    def run(_args):
        raise exc

    return run


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (PermissionError(13, "Permission denied", "/x/y"), 2, "Permission denied: '/x/y'"),
        (ValueError("bad value for --foo"), 2, "bad value for --foo"),
    ],
)
def test_failures_are_one_line_messages(monkeypatch, capsys, exc, code, message):
    monkeypatch.setattr(layers_cli, "run", _raising(exc))
    assert cli.main(["layers", "--model", "testbed"]) == code
    err = capsys.readouterr().err
    assert err.startswith("mixdq layers: ") and message in err and "Traceback" not in err


def test_closed_pipe_is_not_an_error():
    """``mixdq layers ... | head -1``: the reader closes the pipe early."""
    import subprocess
    import sys

    config = sdxl_turbo("unet_config.json")
    code = "import sys; from mixdq_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "layers", "--unet-config", str(config), "--format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    proc.stdout.readline()
    proc.stdout.close()  # 236 kB of JSON follow: the writer hits a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "Broken pipe" not in err
