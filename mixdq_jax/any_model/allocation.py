"""Bits for any Flax model: the sweep's scores into MixDQ's integer program
(`mixdq_jax.allocation`), one program per layer group, under an average-bit budget."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mixdq_jax.allocation.budget import GroupAllocator
from mixdq_jax.allocation.milp import DEFAULT_BAND, BitProgram
from mixdq_jax.allocation.objectives import OBJECTIVES, program_scores
from mixdq_jax.any_model.sensitivity import Sensitivity
from mixdq_jax.official_format import SENSITIVITY_BITS
from mixdq_jax.quant.qconfig import FLOAT_BITS, QConfig, QuantSpec
from mixdq_jax.quant.registry import LayerInfo


@dataclass(frozen=True, kw_only=True)
class Budget:
    """The average bit-widths to reach and the bit-widths to choose from.

    ``weight_bits``: size-weighted average over the weights (16: keep float);
    ``act_bits``: the same over the layers' input elements per sample. ``*_candidates``: a
    subset of the swept bits (activations at 2 bits rarely survive, hence 4/8). With
    content and quality groups, ``content_ratio`` is MixDQ's ``k = b_content / b_quality``
    (the overall average stays at the budget). ``objective``: what the integer program
    maximises (`mixdq_jax.allocation.objectives`); ``None``: ``"noise"`` for SQNR scores,
    ``"official"`` (the raw scores) for a custom metric. ``band``: the program's tolerance
    around each group's budget (widen it for a model with few layers).
    """

    weight_bits: float = 4.0
    act_bits: float = 8.0
    weight_candidates: tuple[int, ...] = SENSITIVITY_BITS
    act_candidates: tuple[int, ...] = (4, 8)
    content_ratio: float = 1.0
    objective: str | None = None
    band: float = DEFAULT_BAND

    def __post_init__(self) -> None:
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(f"Budget: objective must be one of {OBJECTIVES} or None")
        for attr in ("weight_candidates", "act_candidates"):
            cands = tuple(sorted({int(b) for b in getattr(self, attr)}))
            if not cands or any(b not in SENSITIVITY_BITS for b in cands):
                raise ValueError(f"Budget: {attr} must be among {SENSITIVITY_BITS}, got {cands}")
            object.__setattr__(self, attr, cands)


def _scores(
    sensitivity: Sensitivity, kind: str, names: Sequence[str], metric: str, objective: str | None
) -> dict[str, tuple[float, ...]]:
    """Per-layer scores in the allocator's ``(s@2, s@4, s@8)`` order (an unmeasured bit-width
    holds 0 and must not be a candidate)."""
    measured = sensitivity.scores[kind]
    raw = {
        n: tuple(
            measured[n][sensitivity.bits.index(b)] if b in sensitivity.bits else 0.0
            for b in SENSITIVITY_BITS
        )
        for n in names
    }
    if metric == "custom":
        if objective not in (None, "official"):
            raise ValueError(
                f"objective {objective!r} needs SQNR scores; a custom metric's scores are "
                "summed as they are (objective 'official')"
            )
        return raw
    return program_scores(raw, "sqnr", objective or "noise")


def _bits(
    sensitivity: Sensitivity,
    kind: str,
    layers: Sequence[LayerInfo],
    target: float,
    candidates: tuple[int, ...],
    budget: Budget,
) -> dict[str, int]:
    names = [layer.name for layer in layers]
    if target >= FLOAT_BITS:
        return dict.fromkeys(names, FLOAT_BITS)
    if kind not in sensitivity.scores:
        raise ValueError(f"a {kind} budget of {target:g} bits needs a sweep of {kind} bits")
    unmeasured = sorted(set(candidates) - set(sensitivity.bits))
    if unmeasured:
        raise ValueError(f"{kind} candidates {unmeasured} were not swept ({sensitivity.bits})")
    sizes = {
        layer.name: float(layer.weight_params if kind == "weight" else layer.input_size)
        for layer in layers
    }
    content = [layer.name for layer in layers if layer.group == "content"]
    quality = [layer.name for layer in layers if layer.group != "content"]
    metrics, objective = sensitivity.metrics, budget.objective
    if content and quality:
        allocator = GroupAllocator(
            content_sensitivity=_scores(sensitivity, kind, content, metrics["content"], objective),
            quality_sensitivity=_scores(sensitivity, kind, quality, metrics["quality"], objective),
            sizes=sizes,
            content_candidates=candidates,
            quality_candidates=candidates,
        )
        return allocator.allocate(target, budget.content_ratio, band=budget.band).bits
    metric = metrics["content" if content else "quality"]
    program = BitProgram(
        _scores(sensitivity, kind, names, metric, objective), sizes, candidates=candidates
    )
    return dict(program.solve(target, band=budget.band).bits)


def allocate(
    sensitivity: Sensitivity,
    layers: Sequence[LayerInfo],
    ranges: Mapping[str, Any],
    *,
    budget: Budget = Budget(),  # noqa: B008 - frozen
) -> QConfig:
    """The ``QConfig`` whose weight and activation bits maximise the summed layer scores
    under ``budget`` (MixDQ's integer program, per group), with the calibrated ``ranges``.
    Raises `mixdq_jax.allocation.InfeasibleBudget` when no assignment lands in the band."""
    w = _bits(sensitivity, "weight", layers, budget.weight_bits, budget.weight_candidates, budget)
    a = _bits(sensitivity, "act", layers, budget.act_bits, budget.act_candidates, budget)
    spec = QuantSpec(weight_bits=w, act_bits=a, bos_aware=False, shortcut_split=False)
    return spec.to_qconfig([layer.name for layer in layers], ranges)
