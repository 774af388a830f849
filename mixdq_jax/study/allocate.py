"""The study's bit allocations: weight bits per method and setting, activation policies.

Each function is the allocation of one kind of row (`config.Method`); `run` caches their
results in the run directory (`RUN/configs/<setting>_<weights>.yaml`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mixdq_jax.allocation import (
    WEIGHT_K_SWEEP,
    BitProgram,
    GroupAllocator,
    average_bits,
    budget_sweep,
    most_sensitive,
    naive_sorting,
    pareto_front,
    random_allocation,
)
from mixdq_jax.quant.qconfig import FLOAT_BITS
from mixdq_jax.quant.registry import LayerInfo

Sensitivities = Mapping[tuple[str, str], Mapping[str, tuple[float, ...]]]  # (kind, metric)


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


def uniform_weights(layers: Layers, target: float) -> dict[str, int] | None:
    """Every layer at the budget; ``None`` when the budget is not a whole bit-width."""
    return {n: int(target) for n in layers.names} if float(target).is_integer() else None


def sqnr_only_weights(sens: Sensitivities, layers: Layers, target: float) -> dict[str, int]:
    """One integer program over all layers with SQNR (the "MP-only" baseline)."""
    program = BitProgram(
        {n: sens["weight", "sqnr"][n] for n in layers.names}, layers.w_size, candidates=(2, 4, 8)
    )
    return dict(program.solve(target).bits)


def mixdq_weight_candidates(sens: Sensitivities, layers: Layers, target: float) -> list:
    """Algorithm 1's (B, k) sweep for weights, reduced to its Pareto front."""
    alloc = GroupAllocator(
        content_sensitivity={n: sens["weight", "ssim"][n] for n in layers.content},
        quality_sensitivity={n: sens["weight", "sqnr"][n] for n in layers.quality},
        sizes=layers.w_size,
        content_candidates=(2, 4, 8),
        quality_candidates=(4, 8),
    )
    targets = budget_sweep(target, delta=0.3, num=10) if target < 8 else (8.0,)
    cands = alloc.sweep(targets=targets, ks=WEIGHT_K_SWEEP if target < 8 else (1.0,))
    if not cands:
        raise ValueError(f"MixDQ allocation: no feasible (B, k) for a {target}-bit budget")
    return pareto_front(
        cands,
        bits=lambda c: c.avg_bits(layers.w_size),
        score=lambda c: c.content.sensitivity + c.quality.sensitivity / 100.0,
    )


def pick_by_image_mse(
    cands: Sequence[Any],
    images: Callable[[Mapping[str, int]], np.ndarray],
    reference: np.ndarray,
    sens: Sensitivities,
    layers: Layers,
    seed: int,
) -> tuple[dict[str, int], dict[str, Any]]:
    """The candidate with the lowest image MSE vs float (as the official pick), and the
    Pareto-plot data: every candidate and the paper's two baselines at the same budget
    (random, naive sorting), scored the same way. ``images(weight_bits)`` renders the
    selection prompts."""
    scored = [(float(np.mean((images(c.bits) - reference) ** 2)), c) for c in cands]
    points = [
        {"avg_bits": c.avg_bits(layers.w_size), "mse": m, "target": c.target, "k": c.k}
        for m, c in scored
    ]
    target = min(c.avg_bits(layers.w_size) for c in cands)
    baselines = []
    for label, bits in (
        (
            "random",
            random_allocation(layers.w_size, candidates=(2, 4, 8), budget=target, seed=seed),
        ),
        (
            "naive_sorting",
            naive_sorting(
                {n: sens["weight", "sqnr"][n] for n in layers.names},
                layers.w_size,
                candidates=(2, 4, 8),
                budget=target,
            ),
        ),
    ):
        mse = float(np.mean((images(bits) - reference) ** 2))
        baselines.append(
            {"method": label, "avg_bits": average_bits(bits, layers.w_size), "mse": mse}
        )
    best = dict(min(scored, key=lambda s: s[0])[1].bits)
    return best, {"candidates": points, "baselines": baselines}


def protected_acts(sens: Sensitivities, layers: Layers, fraction: float) -> set[str]:
    """Top ``fraction`` most sensitive activation layers of each group at 4 bits."""
    content = {n: sens["act", "ssim"][n] for n in layers.content}
    quality = {n: sens["act", "sqnr"][n] for n in layers.quality}
    return set(most_sensitive(content, fraction=fraction, bits=4)) | set(
        most_sensitive(quality, fraction=fraction, bits=4)
    )


def act_bits(policy: str, bits: int, layers: Layers, protected: set[str]) -> dict[str, int]:
    """Activation bits of a row: uniform, or MixDQ's (the protected layers float)."""
    if policy == "uniform" or bits >= FLOAT_BITS:
        return dict.fromkeys(layers.names, bits)
    return {n: (FLOAT_BITS if n in protected else bits) for n in layers.names}
