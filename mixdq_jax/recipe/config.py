"""Quantizer presets: the settings the paper leaves open, as data.

Targets and methods live in `mixdq_jax.methods` (the method registry)."""

from __future__ import annotations

from dataclasses import dataclass

from mixdq_jax.quant.qconfig import FLOAT_BITS


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Quantizer settings the paper leaves open.

    ``symmetric_weights``: symmetric per-channel weights (else asymmetric min/max per
    channel). ``range_method`` / ``momentum``: activation ranges as the running min/max or the
    official EMA of per-batch ranges. ``observe_weight_bits``: the weight bit-width of the
    model whose activations are observed (the official code observes on the W8 model; 16 =
    the float model). The official code's integer-program objective is a knob of the
    allocation (``AllocationOptions(objective="official")``; ``mixdq quantize --preset
    official`` sets it).
    """

    name: str
    symmetric_weights: bool
    range_method: str
    momentum: float = 0.95
    observe_weight_bits: int = FLOAT_BITS


PRESETS: dict[str, Preset] = {
    "ours": Preset(name="ours", symmetric_weights=False, range_method="minmax"),
    "official": Preset(
        name="official", symmetric_weights=True, range_method="ema", observe_weight_bits=8
    ),
}
