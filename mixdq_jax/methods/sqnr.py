"""The ``sqnr`` allocator: mixed precision without metric decoupling (Table 3's "+MP").

One integer program over every layer scored by its SQNR sweep, for weights and for
activations; the ``protect_top`` percent lowest-scoring activation layers stay float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mixdq_jax.allocation import OFFICIAL_CANDIDATES, BitProgram, most_sensitive
from mixdq_jax.allocation.objectives import program_scores
from mixdq_jax.methods.allocator import Allocator, act_budget, act_choices, uniform_bits
from mixdq_jax.methods.inputs import AllocationContext, Bits


@dataclass(frozen=True, kw_only=True)
class SqnrProgram(Allocator):
    """One candidate per kind: the program's optimum at the target (band ``knobs.band``)."""

    name: ClassVar[str] = "sqnr"

    def weights(self, ctx: AllocationContext) -> list[Bits]:
        layers, knobs, budget = ctx.layers, ctx.knobs, ctx.target.weight_bits
        if budget >= 8.0:
            return [uniform_bits(layers, budget)]
        sqnr = ctx.scores()["weight", "sqnr"]
        program = BitProgram(
            program_scores({n: sqnr[n] for n in layers.names}, "sqnr", knobs.objective),
            layers.w_size,
            candidates=OFFICIAL_CANDIDATES["weight"][0],
        )
        return [dict(program.solve(budget, band=knobs.band).bits)]

    def protected(self, ctx: AllocationContext) -> set[str]:
        knobs = ctx.knobs
        if not knobs.protect_top:
            return set()
        sqnr = {n: ctx.scores()["act", "sqnr"][n] for n in ctx.layers.names}
        return set(most_sensitive(sqnr, fraction=knobs.protect_top / 100.0,
                                  bits=knobs.protect_bits))  # fmt: skip

    def acts(self, ctx: AllocationContext, protected: set[str]) -> list[Bits]:
        layers, knobs = ctx.layers, ctx.knobs
        rest = [n for n in layers.names if n not in protected]
        sqnr = ctx.scores()["act", "sqnr"]
        scores = program_scores({n: sqnr[n] for n in rest}, "sqnr", knobs.objective)
        program = BitProgram(scores, layers.a_size,
                             candidates=act_choices(ctx.target, knobs) or (4, 8))  # fmt: skip
        average = act_budget(layers, ctx.target, knobs, protected)
        floats = dict.fromkeys(sorted(protected), 16)
        return [{**program.solve(average, band=knobs.band).bits, **floats}]
