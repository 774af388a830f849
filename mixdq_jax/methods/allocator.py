"""The allocator protocol: how a method turns sensitivities and a budget into bit-widths.

An allocator gives *candidate* bit mappings for weights, then for activations given the
protected layers; the recipe renders each candidate on held-out prompts and keeps the one
with the lowest image error vs float (one candidate: no rendering). Built-in allocators:
`uniform` (every layer at the target), `sqnr` (one integer program scored by SQNR: Table 3's
"+MP"), `mixdq` (metric-decoupled groups, Algorithm 1's (B, k) sweep). Write your own as a
frozen dataclass subclassing :class:`Allocator` and register a `Method` with it.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from mixdq_jax.allocation.driver import AllocationOptions
from mixdq_jax.methods.inputs import AllocationContext, Bits, Layers
from mixdq_jax.methods.target import Target
from mixdq_jax.quant.qconfig import FLOAT_BITS

PAPER_ACT_AVERAGE = 7.7


class Allocator(abc.ABC):
    """Candidate bit mappings for one (model, target). ``name`` goes into settings and
    reports; ``uses_scores``: whether it reads the sensitivity sweeps (``ctx.scores()``),
    so a run whose methods need none skips the sweep stage."""

    name: ClassVar[str]
    uses_scores: ClassVar[bool] = True

    def supports(self, target: Target) -> str | None:
        """Why this allocator has no configuration for ``target`` (``None``: it has one)."""
        return None

    @abc.abstractmethod
    def weights(self, ctx: AllocationContext) -> list[Bits]:
        """Weight mappings to choose from (every layer named; 16 keeps a layer float)."""

    def protected(self, ctx: AllocationContext) -> set[str]:
        """Activation layers kept float (asked only for targets that quantize activations)."""
        return set()

    @abc.abstractmethod
    def acts(self, ctx: AllocationContext, protected: set[str]) -> list[Bits]:
        """Activation mappings to choose from, ``protected`` layers at 16 (asked only for
        targets that quantize activations)."""

    def settings(self) -> dict[str, Any]:
        """What a resumed run must match (the names of earlier runs' ``weights``/``acts``)."""
        return {"weights": self.name, "acts": self.name}


LOW_ACT_CHOICES: tuple[int, ...] = (2, 4, 8)


def act_choices(target: Target, knobs: AllocationOptions) -> tuple[int, ...] | None:
    """The activation bit candidates of ``target`` (``None``: the official {4, 8}); below
    A8 the average cannot exceed 4 with {4, 8}, so 2 bits pay for the 8-bit layers."""
    return LOW_ACT_CHOICES if target.act_bits < 8 else None


def act_budget(
    layers: Layers, target: Target, knobs: AllocationOptions, protected: set[str]
) -> float:
    """Average bits of the non-protected activation layers: ``knobs.act_average``; else at
    A8 the paper's 7.7 capped so that ``(16 * P_float + b * P_rest) / P_all <= target`` (on
    SDXL-turbo the 9 float layers hold 3.1% of the elements and 7.7 fits an A8 budget; on a
    small model they can hold more); below A8 the target itself (the float layers are left
    out, as SVDQuant's W4A4 leaves its 16-bit layers out)."""
    if knobs.act_average is not None:
        return knobs.act_average
    if target.act_bits < 8:
        return float(target.act_bits)
    total = sum(layers.a_size.values())
    floats = sum(layers.a_size[n] for n in protected)
    # each group's average may land ``band`` above its budget: keep that inside the target
    fits = (target.act_bits * total - FLOAT_BITS * floats) / (total - floats) - knobs.band
    if fits < 4.0:
        raise ValueError(
            f"the {len(protected)} float activation layers hold {floats / total:.1%} of the "
            f"elements: no {{4, 8}} mix of the others fits A{target.act_bits}; lower "
            "--protect-top or pass --act-average"
        )
    return min(PAPER_ACT_AVERAGE, fits)


def uniform_bits(layers: Layers, bits: float) -> Bits:
    return dict.fromkeys(layers.names, int(bits))
