"""Events around the first call of a big jitted program, the one call that compiles.

Why: on SDXL, XLA compiles the UNet for minutes before anything moves, and a user sees
nothing. The library must stay quiet, so it only emits JAX monitoring events
(:func:`jax.monitoring.record_event`, free without listeners) before and after that call; the
``mixdq`` command listens (`mixdq_jax.cli.compile_notice`), says what is compiling and how
long it took last time, and measures this time from JAX's own compile events.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax import monitoring

START = "/mixdq/first_call/start"
END = "/mixdq/first_call/end"


def signature(args: Any) -> str:
    """A short hash of what a program compiles for: the backend, the argument tree's structure
    and every leaf's shape and dtype."""
    leaves, tree = jax.tree.flatten(args)
    shapes = [
        (tuple(getattr(a, "shape", ())), str(getattr(a, "dtype", type(a).__name__))) for a in leaves
    ]
    text = f"{jax.default_backend()}|{tree}|{shapes}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def first_call(program: str, fn: Callable, *args: Any) -> Iterator[None]:
    """Around a call of the jitted ``fn`` on ``args``: when ``fn`` has no compiled program yet,
    emit :data:`START` before and :data:`END` after a call that returns (an interrupted or
    failed call emits no END). ``program`` names it for a person ("the UNet sampling loop")."""
    if fn._cache_size() > 0:  # compiled already: nothing to wait for
        yield
        return
    key = signature(args)
    monitoring.record_event(START, program=program, signature=key)
    yield
    monitoring.record_event(END, program=program, signature=key)


__all__ = ["END", "START", "first_call", "signature"]
