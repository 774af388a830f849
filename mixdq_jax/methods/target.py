"""A quantization target as the paper writes it (``W4A8``, ``W3.66A16``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mixdq_jax.quant.qconfig import FLOAT_BITS

ACT_TARGETS: tuple[int, ...] = (4, 8, FLOAT_BITS)
_TARGET = re.compile(r"^W(\d+(?:\.\d+)?)A(\d+)$", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True)
class Target:
    """A budget: ``W4A8`` is 4 average weight bits and 8-bit activations (MixDQ: mixed
    {4, 8} at ``act_average`` plus the protected layers in float); ``A4`` averages 4 bits over
    the quantized activation layers (mixed {2, 4, 8}; the protected layers stay float, as
    SVDQuant's W4A4 keeps its 16-bit layers); ``A16`` keeps activations float."""

    weight_bits: float
    act_bits: int

    def __post_init__(self) -> None:
        if not 2.0 <= self.weight_bits <= 8.0 or not math.isfinite(self.weight_bits):
            raise ValueError(f"target weight bits {self.weight_bits} outside [2, 8]")
        if self.act_bits not in ACT_TARGETS:
            raise ValueError(
                f"target activation bits {self.act_bits}: A4 (mixed 2/4/8), A8 (mixed 4/8) "
                "or A16 (float)"
            )

    @classmethod
    def parse(cls, text: str) -> Target:
        """``"W4A8"``, ``"W3.66A16"``, ... (case-insensitive)."""
        match = _TARGET.match(text.strip())
        if match is None:
            raise ValueError(
                f"target {text!r}: expected W<bits>A<bits>, e.g. W8A8, W4A8, W4A4, W3.66A16"
            )
        return cls(weight_bits=float(match.group(1)), act_bits=int(match.group(2)))

    @property
    def name(self) -> str:
        w = self.weight_bits
        return f"W{int(w) if float(w).is_integer() else f'{w:g}'}A{self.act_bits}"

    @property
    def quantizes_acts(self) -> bool:
        return self.act_bits < FLOAT_BITS

    @property
    def whole_weight_bits(self) -> bool:
        return float(self.weight_bits).is_integer()
