"""The error policy of ``mixdq``: input and environment errors are a message and exit 2, a
bug is one line saying so and exit 1, ``--debug`` (or MIXDQ_DEBUG=1) shows the traceback."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import yaml

from mixdq_jax import cli
from mixdq_jax.cli import layers as layers_cli
from mixdq_jax.io_utils import LockError
from tests.cli.conftest import failed, mixdq
from tests.reference_data import sdxl_turbo


def _raising(exc):
    def run(_args):
        raise exc

    return run


@pytest.mark.parametrize(
    "exc",
    [
        zipfile.BadZipFile("File is not a zip file"),
        EOFError("Ran out of input"),
        pickle.UnpicklingError("invalid load key"),
        yaml.YAMLError("mapping values are not allowed here"),
        json.JSONDecodeError("Expecting value", "x", 0),
        LockError("run directory /r is in use by another mixdq command"),
        KeyError("conv_in"),
        MemoryError(),
    ],
)
def test_input_and_environment_errors_exit_2(monkeypatch, capsys, exc):
    monkeypatch.setattr(layers_cli, "run", _raising(exc))
    assert cli.main(["layers", "--model", "testbed"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixdq layers: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2, err
    assert "'conv_in'" not in err  # a KeyError's key, not its repr


def test_a_bug_is_one_line_and_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(layers_cli, "run", _raising(TypeError("unsupported operand")))
    assert cli.main(["layers", "--model", "testbed"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "bug" in err and "TypeError: unsupported operand" in err and "--debug" in err


@pytest.mark.parametrize("where", ["before", "after", "env"])
def test_debug_shows_the_traceback(monkeypatch, where):
    monkeypatch.setattr(layers_cli, "run", _raising(TypeError("unsupported operand")))
    argv = ["layers", "--model", "testbed"]
    if where == "before":
        argv = ["--debug", *argv]
    elif where == "after":
        argv = [*argv, "--debug"]
    else:
        monkeypatch.setenv("MIXDQ_DEBUG", "1")
    with pytest.raises(TypeError, match="unsupported operand"):
        cli.main(argv)


def test_interrupt_and_closed_pipe_keep_their_codes(monkeypatch, capsys):
    monkeypatch.setattr(layers_cli, "run", _raising(KeyboardInterrupt()))
    assert cli.main(["layers", "--model", "testbed"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_warnings_are_one_line_messages(monkeypatch, capsys):
    import warnings

    def run(_args):
        warnings.warn("calib/batch_00000.npz is corrupt", stacklevel=1)
        return 0

    monkeypatch.setattr(layers_cli, "run", run)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["layers", "--model", "testbed"]) == 0
    err = capsys.readouterr().err
    assert err == "mixdq layers: warning: calib/batch_00000.npz is corrupt\n"


def test_a_damaged_input_file_through_the_real_entry_point(tmp_path):
    """A truncated config: exit 2 naming the file, no traceback."""
    config = tmp_path / "unet_config.json"
    config.write_text(sdxl_turbo("unet_config.json").read_text()[:200])
    failed(mixdq("layers", "--unet-config", config), 2, "mixdq layers: error:", str(config))


def test_debug_through_the_real_entry_point(tmp_path):
    config = tmp_path / "missing.json"
    proc = mixdq("--debug", "layers", "--unet-config", config)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "missing.json" in proc.stderr
