"""What an allocator reads: the model's layers, Algorithm 1's settings, the sweeps' scores."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mixdq_jax.allocation import average_bits
from mixdq_jax.allocation.driver import AllocationOptions
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
class AllocationContext:
    """One allocation's inputs: the layers, Algorithm 1's settings (``knobs``, the one options
    type of `mixdq allocate` and the recipe), the target. ``scores()`` runs (or resumes) the
    sweeps the method needs on first call, with the method's BOS handling: allocators that do
    not call it cost no sweep."""

    layers: Layers
    knobs: AllocationOptions
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
