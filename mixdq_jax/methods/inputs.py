"""What an allocator reads: the model's layers, Algorithm 1's knobs, the sweeps' scores."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mixdq_jax.allocation import average_bits
from mixdq_jax.allocation.objectives import check_objective
from mixdq_jax.methods.target import Target
from mixdq_jax.quant.qconfig import FLOAT_BITS
from mixdq_jax.quant.registry import LayerInfo

Sensitivities = Mapping[tuple[str, str], Mapping[str, tuple[float, ...]]]  # (kind, metric)
Bits = dict[str, int]


@dataclass(frozen=True, kw_only=True)
class Layers:
    """The model's quantizable layers as allocations need them: names, groups and sizes."""

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
    within the target: `mixdq_jax.methods.allocator.act_budget`); ``protect_top``: percent
    of layers per group kept float, scored at ``protect_bits``; budgets ``B`` in
    ``[target - b_delta, target]`` (``b_num`` of them); each group's average lands within
    ``band`` of its budget. ``objective``: what the integer program maximises
    (`mixdq_jax.allocation.objectives`): ``"noise"`` by default (it predicts the image error
    far better on the testbed, README), ``"official"`` for the paper's summed SSIM / SQNR dB
    (the ``official`` preset's)."""

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


@dataclass(frozen=True, kw_only=True)
class AllocationContext:
    """One allocation's inputs. ``scores()`` runs (or resumes) the sweeps the method needs
    on first call, with the method's BOS handling: allocators that do not call it cost no
    sweep."""

    layers: Layers
    knobs: AllocationKnobs
    target: Target
    scores: Callable[[], Sensitivities]


def fingerprint(bits: Mapping[str, int]) -> str:
    """A short stable name of a bit mapping (candidate scores are keyed by it)."""
    return hashlib.sha1(json.dumps(sorted(bits.items())).encode()).hexdigest()[:16]


def unique(candidates: Sequence[Mapping[str, int]]) -> list[Bits]:
    """Distinct mappings, first occurrence kept (many (B, k) points give the same bits)."""
    seen, out = set(), []
    for bits in candidates:
        key = json.dumps(sorted(bits.items()))
        if key not in seen:
            seen.add(key)
            out.append(dict(bits))
    return out


def bits_summary(w_bits: Mapping[str, int], a_bits: Mapping[str, int], layers: Layers) -> dict:
    """Average bits as reports state them. ``act_effective_bits`` counts float layers at
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
