"""The ``svdquant`` allocator: SVDQuant's W4A4 (Li et al., ICLR 2025) as one configuration.

Every layer at the target's bits in the low-rank group format (`format.LOWRANK`), except the
layers SVDQuant keeps in 16 bits. Which layers those are on a UNet is our reading, stated in
docs/departures.md: the first and last convs and the timestep / added-condition embedding
MLPs (the inputs and outputs of the network and its conditioning, which every quantization
work on diffusion UNets keeps at high precision).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mixdq_jax.methods.allocator import Allocator
from mixdq_jax.methods.inputs import AllocationContext, Bits
from mixdq_jax.methods.target import Target
from mixdq_jax.quant.qconfig import FLOAT_BITS

SVDQUANT_KEEP: tuple[str, ...] = ("conv_in", "conv_out", "time_embedding.", "add_embedding.")
"""Layer names (exact, or a prefix ending in ``.``) kept in 16 bits."""


def kept(names: list[str], keep: tuple[str, ...]) -> set[str]:
    return {n for n in names for k in keep if n == k or (k.endswith(".") and n.startswith(k))}


@dataclass(frozen=True, kw_only=True)
class KeepUniform(Allocator):
    """One candidate: every layer at the target but the ``keep`` layers, which stay float
    (weights and activations)."""

    name: ClassVar[str] = "uniform-keep"
    uses_scores: ClassVar[bool] = False
    keep: tuple[str, ...] = SVDQUANT_KEEP

    def supports(self, target: Target) -> str | None:
        if not target.whole_weight_bits:
            return f"needs a whole weight bit-width, not {target.weight_bits:g}"
        return None

    def weights(self, ctx: AllocationContext) -> list[Bits]:
        names = ctx.layers.names
        floats = kept(names, self.keep)
        bits = int(ctx.target.weight_bits)
        return [{n: FLOAT_BITS if n in floats else bits for n in names}]

    def protected(self, ctx: AllocationContext) -> set[str]:
        return kept(ctx.layers.names, self.keep)

    def acts(self, ctx: AllocationContext, protected: set[str]) -> list[Bits]:
        bits = ctx.target.act_bits
        return [{n: FLOAT_BITS if n in protected else bits for n in ctx.layers.names}]

    def settings(self) -> dict:
        return {"weights": self.name, "acts": self.name, "keep": list(self.keep)}
