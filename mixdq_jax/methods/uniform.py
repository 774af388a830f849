"""The ``uniform`` allocator: every layer at the target's bits (naive PTQ)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mixdq_jax.methods.allocator import Allocator, uniform_bits
from mixdq_jax.methods.inputs import AllocationContext, Bits
from mixdq_jax.methods.target import Target


@dataclass(frozen=True, kw_only=True)
class Uniform(Allocator):
    """One candidate: every weight at the target, every activation at the target."""

    name: ClassVar[str] = "uniform"
    uses_scores: ClassVar[bool] = False

    def supports(self, target: Target) -> str | None:
        if not target.whole_weight_bits:
            return f"needs a whole weight bit-width, not {target.weight_bits:g}"
        return None

    def weights(self, ctx: AllocationContext) -> list[Bits]:
        return [uniform_bits(ctx.layers, ctx.target.weight_bits)]

    def acts(self, ctx: AllocationContext, protected: set[str]) -> list[Bits]:
        return [uniform_bits(ctx.layers, ctx.target.act_bits)]
