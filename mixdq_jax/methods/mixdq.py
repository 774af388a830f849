"""The ``mixdq`` allocator: metric-decoupled groups and Algorithm 1's (B, k) sweep.

Content layers are scored by SSIM, quality layers by SQNR (sec. 3.2); each (budget B, split
k) point solves one integer program per group, and the distinct results are the candidates
the recipe renders. Protected activation layers follow the official rule: the
``ceil(protect_top %)`` lowest-scoring layers of each group at ``protect_bits``, which on
the official SDXL-turbo sensitivities gives exactly its 9 float layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

from mixdq_jax.allocation.driver import group_candidates, protected_layers
from mixdq_jax.methods.allocator import Allocator, act_budget, act_choices, uniform_bits
from mixdq_jax.methods.inputs import AllocationContext, Bits, unique


@dataclass(frozen=True, kw_only=True)
class MixDQGroups(Allocator):
    """Candidates of the (B, k) sweep for weights and for activations (the one allocation
    driver, `mixdq_jax.allocation.driver`, that `mixdq allocate` runs too)."""

    name: ClassVar[str] = "mixdq"

    def weights(self, ctx: AllocationContext) -> list[Bits]:
        budget = ctx.target.weight_bits
        if budget >= 8.0:
            return [uniform_bits(ctx.layers, budget)]
        return _candidates(ctx, "weight", ctx.layers.names, budget)

    def protected(self, ctx: AllocationContext) -> set[str]:
        layers, knobs = ctx.layers, ctx.knobs
        if not knobs.protect_top:
            return set()
        sens = ctx.scores()
        content = {n: sens["act", "ssim"][n] for n in layers.content}
        quality = {n: sens["act", "sqnr"][n] for n in layers.quality}
        return protected_layers(content, quality, knobs)

    def acts(self, ctx: AllocationContext, protected: set[str]) -> list[Bits]:
        layers = ctx.layers
        rest = [n for n in layers.names if n not in protected]
        average = act_budget(layers, ctx.target, ctx.knobs, protected)
        floats = dict.fromkeys(sorted(protected), 16)
        return [{**bits, **floats} for bits in _candidates(ctx, "act", rest, average)]


def _candidates(
    ctx: AllocationContext, kind: str, names: Sequence[str], budget: float
) -> list[Bits]:
    layers, sens, knobs = ctx.layers, ctx.scores(), ctx.knobs
    sizes = layers.w_size if kind == "weight" else layers.a_size
    choices = act_choices(ctx.target, knobs) if kind == "act" else None
    if choices is not None:  # below A8: {2, 4, 8} where the options name no candidates
        knobs = replace(knobs, content_bits=knobs.content_bits or choices,
                        quality_bits=knobs.quality_bits or choices)  # fmt: skip
    wanted = set(names)
    content = {n: sens[kind, "ssim"][n] for n in layers.content if n in wanted}
    quality = {n: sens[kind, "sqnr"][n] for n in layers.quality if n in wanted}
    _, cands = group_candidates(kind, content, quality, sizes, budget, knobs)
    return unique([c.bits for c in cands])
