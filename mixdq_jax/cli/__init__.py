"""The ``mixdq`` command line; each command is a sub-module exposing ``register``."""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable
from typing import NoReturn

import yaml

from mixdq_jax.cli import config_file
from mixdq_jax.cli.compile_notice import CompileNotice
from mixdq_jax.cli.interrupt import InterruptWatch
from mixdq_jax.io_utils import LockError

# Sub-command modules; each defines ``register(subparsers)`` that adds its parser and sets
# ``func`` (called with the parsed namespace, returns an exit code).
_COMMANDS = (  # in the order a user meets them: --help lists them so
    "demo",
    "quantize",
    "generate",
    "evaluate",
    "inspect",
    "export",
    "calibrate",
    "layers",
    "sensitivity",
    "allocate",
    "bench",
    "testbed",
)

_DESCRIPTION = """\
Quantize few-step text-to-image diffusion models (SDXL-turbo, SD1.5 + LCM) with MixDQ's
mixed-precision recipe, in JAX: per-layer 2/4/8-bit weights and 8-bit activations chosen by
measured sensitivity, exported as packed low-bit weights that run through INT8 kernels.

Start with `mixdq demo` (the whole study on the built-in testbed model, minutes on a CPU),
then `mixdq quantize --model MODEL --target W4A8 --out OUT` on your own checkpoint,
`mixdq generate --model OUT` to render with it, `mixdq evaluate` to measure it and
`mixdq inspect OUT` to see what it holds. The other commands run single steps of the recipe."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as two lines (the error, where to look), not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n  (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mixdq",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mixdq-jax {_version()}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"mixdq_jax.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"mixdq_jax.cli.{name}":
                raise
            continue
        module.register(sub)
    for command in sub.choices.values():  # `mixdq CMD ... --debug` works too
        command.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
        )
    return parser


_DEBUG_HELP = "show the full traceback of an error (also: environment MIXDQ_DEBUG=1)"
_EPILOG = (
    "exit codes: 0 done, 1 internal error (a bug), 2 bad input or environment (the message "
    "names the file, value or folder), 3 a quality gate failed (mixdq evaluate --fail-if), "
    "130 interrupted (finished results are kept)"
)

# Errors caused by the input or the environment (missing or corrupt files, bad values, a
# folder in use): a message naming the thing and exit 2. Anything else is a bug: exit 1.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # bad values, json.JSONDecodeError, checkpoint/format errors
    KeyError,
    OSError,  # missing files, permissions, full disk
    EOFError,  # truncated pickle / npy files
    zipfile.BadZipFile,  # truncated or corrupt .npz
    pickle.UnpicklingError,
    yaml.YAMLError,
    LockError,
    MemoryError,
)


def _version() -> str:
    from mixdq_jax import __version__  # noqa: PLC0415

    return __version__


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("MIXDQ_DEBUG", "") not in (
        "", "0",
    )  # fmt: skip


def _message(err: BaseException) -> str:
    """The error as one or two lines: its own message, not a repr (KeyError quotes its key)."""
    if isinstance(err, MemoryError):
        return "out of host memory" + (f": {err}" if str(err) else "")
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, zipfile.BadZipFile | EOFError | pickle.UnpicklingError):
        text = f"corrupt or truncated file ({type(err).__name__}: {text})"
    lines = [ln for ln in text.strip().splitlines() if ln.strip()] or [type(err).__name__]
    return "\n  ".join(lines[:2]) + (" ..." if len(lines) > 2 else "")


def _device_oom(err: BaseException) -> bool:
    """XLA's out-of-memory error (a RuntimeError subclass; jax not imported here)."""
    return type(err).__name__ == "XlaRuntimeError" and "RESOURCE_EXHAUSTED" in str(err)


def _warning_printer(name: str) -> Callable[..., None]:
    """Warnings as ``mixdq CMD: warning: ...`` lines (not file:line source echoes)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{name}: warning: {message}", file=file or sys.stderr)

    return show


def main(argv: list[str] | None = None) -> int:
    # a command that takes --config FILE gets the file's options under the command line's
    args = config_file.parse_args(build_parser(), argv)
    name = f"mixdq {args.command}"
    # "compiling ..." before a big program's first call; Ctrl-C during a long XLA call
    with CompileNotice(name), InterruptWatch(name):
        if _debug(args):
            return int(args.func(args) or 0)
        with warnings.catch_warnings():  # restores the warning printer when the command ends
            warnings.showwarning = _warning_printer(name)
            return _run(args, name)


def _run(args: argparse.Namespace, name: str) -> int:
    """The command, with every failure turned into a message and an exit code."""
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (`mixdq layers | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except _USER_ERRORS as err:
        print(f"{name}: error: {_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"{name}: interrupted; results already written are kept (calibrate, "
            "sensitivity, quantize, generate and demo resume when run again)",
            file=sys.stderr,
        )
        return 130
    except Exception as err:  # noqa: BLE001  (anything else is a bug: say so, no traceback)
        if _device_oom(err):
            print(f"{name}: error: out of device memory: {_message(err)}", file=sys.stderr)
            return 2
        print(
            f"{name}: internal error (a bug in mixdq-jax): {type(err).__name__}: "
            f"{_message(err)}; rerun with --debug for the traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
