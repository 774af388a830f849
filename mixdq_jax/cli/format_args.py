"""The ``--lowrank-*`` options of the low-rank group format (``svdquant``, ``mixdq+lowrank``),
shared by ``mixdq quantize`` and ``mixdq demo``."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from mixdq_jax.cli import argtypes


def add_lowrank_args(p: argparse.ArgumentParser | Any) -> None:
    """SVDQuant's settings as defaults (rank 32, groups of 64)."""
    p.add_argument(
        "--lowrank-rank", type=argtypes.positive_int, default=None,
        help="low-rank methods: the branch's rank (32, SVDQuant's; with --lowrank-fraction "
        "the most any layer gets)",
    )  # fmt: skip
    p.add_argument(
        "--lowrank-fraction", type=argtypes.float_in(0.0, 1.0, "a fraction"), default=None,
        help="low-rank methods: size each layer's branch to hold this fraction of its "
        "weights (rank round(f K N / (K + N))); 0.05 is rank 32 on SDXL's 1280-wide layers, "
        "the testbed's documented rows use it (rank 32 would be its whole matrices)",
    )  # fmt: skip
    p.add_argument(
        "--lowrank-alphas", type=argtypes.float_in(0.0, 1.0, "a migration strength"),
        nargs="+", default=None, metavar="ALPHA",
        help="low-rank methods: the smoothing strengths searched per layer (20 values, 0 to "
        "0.95, deepcompressor's grid; one value fixes it, e.g. for a bounded full-size run)",
    )  # fmt: skip
    p.add_argument(
        "--lowrank-group", type=argtypes.positive_int, default=None,
        help="low-rank methods: input channels per quantization group (64, SVDQuant's)",
    )  # fmt: skip


def with_lowrank_args(method: Any, args: argparse.Namespace) -> Any:
    """``method`` with the ``--lowrank-*`` settings (unchanged when none is given; an error
    when given for a method without the low-rank format)."""
    rank = getattr(args, "lowrank_rank", None)
    fraction = getattr(args, "lowrank_fraction", None)
    group = getattr(args, "lowrank_group", None)
    alphas = getattr(args, "lowrank_alphas", None)
    if rank is None and fraction is None and group is None and alphas is None:
        return method
    fmt = method.format
    if fmt.lowrank is None:
        raise ValueError(
            f"--lowrank-*: method {method.name} has no low-rank branch (its format is "
            f"{fmt.name}); use --method svdquant or mixdq+lowrank"
        )
    settings = fmt.lowrank
    if rank is not None:
        settings = replace(settings, rank=rank)
    if fraction is not None:
        settings = replace(settings, rank_fraction=fraction)
    if alphas is not None:
        settings = replace(settings, alphas=tuple(dict.fromkeys(alphas)))
    if group is not None and group % 2:
        raise ValueError(f"--lowrank-group {group}: must be even (two 4-bit codes per byte)")
    fmt = replace(fmt, lowrank=settings, group_size=group or fmt.group_size)
    return replace(method, format=fmt)
