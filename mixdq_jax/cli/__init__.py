"""The ``mixdq`` command line: one sub-module per command, each exposing ``register``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Sub-command modules; each defines ``register(subparsers)`` that adds its parser and sets
# ``func`` (called with the parsed namespace, returns an exit code).
_COMMANDS = (
    "generate",
    "calibrate",
    "layers",
    "sensitivity",
    "allocate",
    "evaluate",
    "demo",
    "testbed",
    "export",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixdq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"mixdq_jax.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"mixdq_jax.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (`mixdq layers | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, KeyError, OSError) as err:  # OSError: missing files, permissions
        print(f"mixdq {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"mixdq {args.command}: interrupted; results already written are kept (calibrate, "
            "sensitivity, generate and demo resume when run again)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
