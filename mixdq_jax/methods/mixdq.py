"""The ``mixdq`` allocator: metric-decoupled groups and Algorithm 1's (B, k) sweep.

Content layers are scored by SSIM, quality layers by SQNR (sec. 3.2); each (budget B, split
k) point solves one integer program per group, and the distinct results are the candidates
the recipe renders. Protected activation layers follow the official rule: the
``ceil(protect_top %)`` lowest-scoring layers of each group at ``protect_bits``, which on
the official SDXL-turbo sensitivities gives exactly its 9 float layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from mixdq_jax.allocation import (
    ACT_K_SWEEP,
    OFFICIAL_CANDIDATES,
    WEIGHT_K_SWEEP,
    GroupAllocator,
    budget_sweep,
    most_sensitive,
)
from mixdq_jax.allocation.objectives import program_scores
from mixdq_jax.methods.allocator import Allocator, act_budget, uniform_bits
from mixdq_jax.methods.inputs import AllocationContext, Bits, unique


@dataclass(frozen=True, kw_only=True)
class MixDQGroups(Allocator):
    """Candidates of the (B, k) sweep for weights and for activations."""

    name: ClassVar[str] = "mixdq"

    def weights(self, ctx: AllocationContext) -> list[Bits]:
        budget, knobs = ctx.target.weight_bits, ctx.knobs
        if budget >= 8.0:
            return [uniform_bits(ctx.layers, budget)]
        budgets = budget_sweep(budget, delta=knobs.b_delta, num=knobs.b_num)
        return _sweep(ctx, "weight", ctx.layers.names, budgets, WEIGHT_K_SWEEP)

    def protected(self, ctx: AllocationContext) -> set[str]:
        layers, knobs = ctx.layers, ctx.knobs
        if not knobs.protect_top:
            return set()
        sens = ctx.scores()
        fraction, bits = knobs.protect_top / 100.0, knobs.protect_bits
        content = {n: sens["act", "ssim"][n] for n in layers.content}
        quality = {n: sens["act", "sqnr"][n] for n in layers.quality}
        return set(most_sensitive(content, fraction=fraction, bits=bits)) | set(
            most_sensitive(quality, fraction=fraction, bits=bits)
        )

    def acts(self, ctx: AllocationContext, protected: set[str]) -> list[Bits]:
        layers, knobs = ctx.layers, ctx.knobs
        rest = [n for n in layers.names if n not in protected]
        average = act_budget(layers, ctx.target, knobs, protected)
        budgets = budget_sweep(average, delta=knobs.b_delta, num=knobs.b_num)
        floats = dict.fromkeys(sorted(protected), 16)
        return [{**bits, **floats} for bits in _sweep(ctx, "act", rest, budgets, ACT_K_SWEEP)]


def _sweep(
    ctx: AllocationContext,
    kind: str,
    names: Sequence[str],
    targets: Sequence[float],
    ks: Sequence[float],
) -> list[Bits]:
    layers, knobs, sens = ctx.layers, ctx.knobs, ctx.scores()
    sizes = layers.w_size if kind == "weight" else layers.a_size
    content_bits, quality_bits = OFFICIAL_CANDIDATES[kind]
    wanted = set(names)
    content = {n: sens[kind, "ssim"][n] for n in layers.content if n in wanted}
    quality = {n: sens[kind, "sqnr"][n] for n in layers.quality if n in wanted}
    alloc = GroupAllocator(
        content_sensitivity=program_scores(content, "ssim", knobs.objective),
        quality_sensitivity=program_scores(quality, "sqnr", knobs.objective),
        sizes=sizes,
        content_candidates=content_bits,
        quality_candidates=quality_bits,
    )
    cands = alloc.sweep(targets=targets, ks=ks, band=knobs.band)
    if not cands:
        raise ValueError(
            f"MixDQ {kind} allocation: no (B, k) point of the sweep is feasible for budgets "
            f"{targets[0]:.3f}..{targets[-1]:.3f}"
        )
    return unique([c.bits for c in cands])
