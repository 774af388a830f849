"""Argument types that check ranges at parse time, so a bad value fails before a model loads.

Each is an ``argparse`` ``type=`` function: a value out of range is an ``ArgumentTypeError``
(argparse prints ``mixdq CMD: error: argument --x: ...`` and exits 2), never silently replaced
by a default later (``--height 0`` must not become the native size).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from mixdq_jax.quant.qconfig import FLOAT_BITS, QUANT_BITS

MAX_SEED = 2**32 - 1  # jax.random.key keeps the low 32 bits: 2**32 would silently be seed 0


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, steps, sizes)."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def nonneg_int(text: str) -> int:
    """An integer >= 0 (indices)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed(text: str) -> int:
    """A seed in [0, 2**32 - 1]: JAX keys keep 32 bits, so larger seeds would alias."""
    value = _int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (a LoRA scale may be negative)."""
    return _float(text)


def nonneg_float(text: str) -> float:
    """A finite number >= 0 (guidance scale, beta)."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1]."""
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value:g}")
    return value


def float_in(lo: float, hi: float, what: str) -> Callable[[str], float]:
    """A finite number in ``[lo, hi]``; ``what`` says what the range is."""

    def parse(text: str) -> float:
        value = _float(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} is in [{lo:g}, {hi:g}], got {value:g}")
        return value

    return parse


def existing_file(text: str) -> Path:
    """A path that must be an existing file (prompts, LoRA, layer lists)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return path


def existing_dir(text: str) -> Path:
    """A path that must be an existing folder (a calibrated run)."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    return path


def scheduler_name(text: str) -> str:
    """``--scheduler``: one of the schedulers this package implements (checked here, not
    after the model has loaded)."""
    from mixdq_jax.schedulers import SCHEDULERS  # noqa: PLC0415  (only when the option is given)

    if text not in SCHEDULERS:
        raise argparse.ArgumentTypeError(f"{text!r}: supported are {', '.join(SCHEDULERS)}")
    return text


def bits_or_file(text: str) -> str:
    """``--weight-bits``/``--act-bits``: a supported bit-width or an existing YAML file (read
    later, when the model's layers are known)."""
    if text.lstrip("+-").isdigit():
        value = int(text)
        if value not in (*QUANT_BITS, FLOAT_BITS):
            raise argparse.ArgumentTypeError(
                f"{value}: supported bit-widths are {min(QUANT_BITS)}..{max(QUANT_BITS)} or "
                f"{FLOAT_BITS} (float)"
            )
        return str(value)
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: neither a bit-width nor an existing file")
    return text


def bits_list(allowed: tuple[int, ...]) -> Callable[[str], tuple[int, ...]]:
    """Comma-separated bit-widths, each in ``allowed``, no repeats (``"2,4,8"``)."""

    def parse(text: str) -> tuple[int, ...]:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        values = tuple(_int(p) for p in parts)
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated bit-widths, got {text!r}")
        bad = [b for b in values if b not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unsupported bit-width(s) {bad}; choose from {list(allowed)}"
            )
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"repeated bit-width in {text!r}")
        return values

    return parse
