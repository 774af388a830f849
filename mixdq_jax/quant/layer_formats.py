"""The per-layer formats a latency- or size-budgeted search chooses among (one per layer).

A layer format is a whole way of running one layer: weight and activation bits and the number
grid. ``float`` keeps the layer as written; ``fp8`` is FP8 e4m3 weights (per output channel)
and activations (per tensor, calibrated); ``w8a8`` / ``w4a8`` are the integer grid with
calibrated 8-bit activations (the int8 GEMM); ``w4a16`` is weight-only (4-bit storage,
dequantized, float GEMM); ``w4a4lr`` is SVDQuant's groups of 64 with smoothing and a 16-bit
low-rank branch (`mixdq_jax.quant.lowrank`). Cost tables (`mixdq_jax.deploy.layer_costs`),
the format sweep and the one-hot program all key their columns by these names, so a new
format is one more entry here (plus its deployed path and its fake quantizer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pallas_kernels.grid import FLOAT_BITS


@dataclass(frozen=True, kw_only=True)
class LayerFormat:
    """``w_bits`` / ``a_bits``: 16 = float. ``fp8``: the FP8 e4m3 grid instead of the
    integer one. ``lowrank``: SVDQuant's group format with its low-rank branch."""

    name: str
    w_bits: int
    a_bits: int
    fp8: bool = False
    lowrank: bool = False

    @property
    def is_float(self) -> bool:
        return self.w_bits >= FLOAT_BITS and self.a_bits >= FLOAT_BITS

    @property
    def quantizes_acts(self) -> bool:
        return self.a_bits < FLOAT_BITS


FLOAT = LayerFormat(name="float", w_bits=FLOAT_BITS, a_bits=FLOAT_BITS)
LAYER_FORMATS: dict[str, LayerFormat] = {
    f.name: f
    for f in (
        FLOAT,
        LayerFormat(name="fp8", w_bits=8, a_bits=8, fp8=True),
        LayerFormat(name="w8a8", w_bits=8, a_bits=8),
        LayerFormat(name="w4a8", w_bits=4, a_bits=8),
        LayerFormat(name="w4a16", w_bits=4, a_bits=FLOAT_BITS),
        LayerFormat(name="w4a4lr", w_bits=4, a_bits=4, lowrank=True),
    )
}
DEFAULT_SEARCH_FORMATS = ("float", "fp8", "w8a8", "w4a8", "w4a16")


def op_bits(w_bits: int, a_bits: int) -> int:
    """Bits of one multiply (a BOPs term): ``w x a`` with quantized activations, FP16 x FP16
    without (weight-only layers dequantize and multiply in float)."""
    if a_bits >= FLOAT_BITS:
        return FLOAT_BITS * FLOAT_BITS
    return min(w_bits, FLOAT_BITS) * a_bits


def parse_formats(names: str | Iterable[str], what: str = "--formats") -> tuple[LayerFormat, ...]:
    """Formats from ``"float,w8a8,..."`` or a list of names, in the given order, no repeats;
    ``float`` is always included (every layer can stay as written)."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names)]
    items = [n for n in items if n]
    unknown = [n for n in items if n not in LAYER_FORMATS]
    if unknown:
        raise ValueError(
            f"{what}: unknown format(s) {unknown}; known: {', '.join(LAYER_FORMATS)}"
        )
    dup = sorted({n for n in items if items.count(n) > 1})
    if dup:
        raise ValueError(f"{what}: format(s) {dup} given twice")
    if "float" not in items:
        items.insert(0, "float")
    return tuple(LAYER_FORMATS[n] for n in items)
