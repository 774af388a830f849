"""The recipe's bit allocations: pure functions of sensitivities and layer sizes.

Each method (`config.Method`) gives a list of *candidate* bit-width mappings for weights and
for activations; the recipe picks among several by image error vs float (`select`). Protected
activation layers (the paper's top 1%) are chosen here too, by the official rule: the
``ceil(1%)`` lowest-scoring layers of each group at 8 bits (SSIM for content, SQNR for
quality), which on the official SDXL-turbo sensitivities gives exactly its 9 float layers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mixdq_jax.allocation import (
    ACT_K_SWEEP,
    OFFICIAL_CANDIDATES,
    WEIGHT_K_SWEEP,
    BitProgram,
    GroupAllocator,
    average_bits,
    budget_sweep,
    most_sensitive,
)
from mixdq_jax.allocation.objectives import check_objective, program_scores
from mixdq_jax.quant.qconfig import FLOAT_BITS
from mixdq_jax.quant.registry import LayerInfo
from mixdq_jax.recipe.config import Method, Target

Sensitivities = Mapping[tuple[str, str], Mapping[str, tuple[float, ...]]]  # (kind, metric)
Bits = dict[str, int]


@dataclass(frozen=True, kw_only=True)
class Layers:
    """The UNet's layers as the allocations need them: names, groups and sizes."""

    names: list[str]
    content: list[str]
    quality: list[str]
    w_size: dict[str, float]
    a_size: dict[str, float]

    @classmethod
    def of(cls, layers: Sequence[LayerInfo]) -> Layers:
        return cls(
            names=[layer.name for layer in layers],
            content=[layer.name for layer in layers if layer.group == "content"],
            quality=[layer.name for layer in layers if layer.group == "quality"],
            w_size={layer.name: float(layer.weight_params) for layer in layers},
            a_size={layer.name: float(layer.input_size) for layer in layers},
        )


@dataclass(frozen=True, kw_only=True)
class AllocationKnobs:
    """Algorithm 1's settings (official defaults). ``act_average``: the average activation
    bits of the non-protected layers for an A8 target (``None``: the paper's 7.7, lowered
    where needed so that the effective average, float layers counted at 16 bits, stays
    within the target: see :func:`act_budget`); ``protect_top``: percent of layers per
    group kept float, scored at ``protect_bits``; budgets ``B`` in ``[target - b_delta,
    target]`` (``b_num`` of them); each group's average lands within ``band`` of its budget.
    ``objective``: what the integer program maximises (`mixdq_jax.allocation.objectives`):
    ``"noise"`` by default (it predicts the image error far better on the testbed, README),
    ``"official"`` for the paper's summed SSIM / SQNR dB (the ``official`` preset's)."""

    act_average: float | None = None
    protect_top: float = 1.0
    protect_bits: int = 8
    b_delta: float = 0.3
    b_num: int = 10
    band: float = 0.02
    objective: str = "noise"

    def __post_init__(self) -> None:
        check_objective(self.objective)
        if self.act_average is not None and not 4.0 <= self.act_average <= 8.0:
            raise ValueError(f"act_average {self.act_average} outside the {{4, 8}} range")
        if not 0.0 <= self.protect_top <= 100.0:
            raise ValueError(f"protect_top {self.protect_top} is a percentage in [0, 100]")
        if self.protect_bits not in (2, 4, 8):
            raise ValueError(f"protect_bits {self.protect_bits}: scores exist at 2, 4, 8 bits")
        if self.b_num < 1 or self.b_delta < 0 or self.band <= 0:
            raise ValueError("need b_num >= 1, b_delta >= 0 and band > 0")


def fingerprint(bits: Mapping[str, int]) -> str:
    """A short stable name of a bit mapping (candidate scores are keyed by it)."""
    return hashlib.sha1(json.dumps(sorted(bits.items())).encode()).hexdigest()[:16]


def _unique(candidates: Sequence[Mapping[str, int]]) -> list[Bits]:
    """Distinct mappings, first occurrence kept (many (B, k) points give the same bits)."""
    seen, out = set(), []
    for bits in candidates:
        key = json.dumps(sorted(bits.items()))
        if key not in seen:
            seen.add(key)
            out.append(dict(bits))
    return out


def protected_acts(
    sens: Sensitivities, layers: Layers, method: Method, knobs: AllocationKnobs
) -> set[str]:
    """Activation layers kept float: none for uniform activations; the ``protect_top``
    percent lowest-scoring at ``protect_bits`` of each group (MixDQ) or of all layers by
    SQNR (the SQNR-only baseline)."""
    if method.acts == "uniform" or not knobs.protect_top:
        return set()
    fraction, bits = knobs.protect_top / 100.0, knobs.protect_bits
    if method.acts == "sqnr":
        sqnr = {n: sens["act", "sqnr"][n] for n in layers.names}
        return set(most_sensitive(sqnr, fraction=fraction, bits=bits))
    content = {n: sens["act", "ssim"][n] for n in layers.content}
    quality = {n: sens["act", "sqnr"][n] for n in layers.quality}
    return set(most_sensitive(content, fraction=fraction, bits=bits)) | set(
        most_sensitive(quality, fraction=fraction, bits=bits)
    )


def _mixdq_sweep(
    sens: Sensitivities,
    kind: str,
    names: Sequence[str],
    layers: Layers,
    sizes: Mapping[str, float],
    targets: Sequence[float],
    ks: Sequence[float],
    knobs: AllocationKnobs,
) -> list[Bits]:
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
    return _unique([c.bits for c in cands])


def weight_candidates(
    sens: Sensitivities, layers: Layers, method: Method, target: Target, knobs: AllocationKnobs
) -> list[Bits]:
    """The weight mappings to choose from (one for uniform and SQNR-only)."""
    budget = target.weight_bits
    if method.weights == "uniform" or budget >= 8.0:
        return [dict.fromkeys(layers.names, int(budget))]
    if method.weights == "sqnr":
        program = BitProgram(
            program_scores(
                {n: sens["weight", "sqnr"][n] for n in layers.names}, "sqnr", knobs.objective
            ),
            layers.w_size,
            candidates=OFFICIAL_CANDIDATES["weight"][0],
        )
        return [dict(program.solve(budget, band=knobs.band).bits)]
    return _mixdq_sweep(
        sens, "weight", layers.names, layers, layers.w_size,
        budget_sweep(budget, delta=knobs.b_delta, num=knobs.b_num), WEIGHT_K_SWEEP, knobs,
    )  # fmt: skip


PAPER_ACT_AVERAGE = 7.7


def act_budget(
    layers: Layers, target: Target, knobs: AllocationKnobs, protected: set[str]
) -> float:
    """Average bits of the non-protected activation layers: ``knobs.act_average``, or the
    paper's 7.7 capped so that ``(16 * P_float + b * P_rest) / P_all <= target`` (on
    SDXL-turbo the 9 float layers hold 3.1% of the elements and 7.7 fits an A8 budget; on a
    small model they can hold more)."""
    if knobs.act_average is not None:
        return knobs.act_average
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


def act_candidates(
    sens: Sensitivities,
    layers: Layers,
    method: Method,
    target: Target,
    knobs: AllocationKnobs,
    protected: set[str],
) -> list[Bits]:
    """The activation mappings to choose from, protected layers at float bits."""
    if not target.quantizes_acts:
        return [dict.fromkeys(layers.names, FLOAT_BITS)]
    if method.acts == "uniform":
        return [dict.fromkeys(layers.names, target.act_bits)]
    rest = [n for n in layers.names if n not in protected]
    floats = dict.fromkeys(sorted(protected), FLOAT_BITS)
    average = act_budget(layers, target, knobs, protected)
    if method.acts == "sqnr":
        scores = program_scores({n: sens["act", "sqnr"][n] for n in rest}, "sqnr", knobs.objective)
        program = BitProgram(scores, layers.a_size, candidates=(4, 8))
        return [{**program.solve(average, band=knobs.band).bits, **floats}]
    budgets = budget_sweep(average, delta=knobs.b_delta, num=knobs.b_num)
    cands = _mixdq_sweep(sens, "act", rest, layers, layers.a_size, budgets, ACT_K_SWEEP, knobs)
    return [{**bits, **floats} for bits in cands]


def bits_summary(w_bits: Mapping[str, int], a_bits: Mapping[str, int], layers: Layers) -> dict:
    """Average bits as the report states them. ``act_effective_bits`` counts float layers at
    16 bits (what the memory traffic pays); ``act_quantized_bits`` averages the others."""
    quantized = {n: b for n, b in a_bits.items() if b < FLOAT_BITS}
    return {
        "weight_avg_bits": average_bits(w_bits, layers.w_size),
        "act_effective_bits": average_bits(a_bits, layers.a_size),
        "act_quantized_bits": (
            average_bits(quantized, layers.a_size) if quantized else float(FLOAT_BITS)
        ),
        "act_float_layers": sorted(n for n, b in a_bits.items() if b >= FLOAT_BITS)
        if quantized
        else [],
    }
