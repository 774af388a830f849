"""Algorithm 1 of MixDQ: split one overall budget between the content and quality groups.

Layers are *content* (cross-attention ``attn2`` and feed-forward ``ff``; scored with SSIM) or
*quality* (everything else; scored with SQNR). The two groups' scores are in different units,
so each group gets its own integer program and its own budget. The split is the official
code's (``get_mean_bit`` in thu-nics/MixDQ ``mixed_precision_scripts/optimize/
integer_programming.py``): with ``r = P_content / P_quality`` (summed sizes) and
``k = b_content / b_quality``, ``b_quality = B (1 + r) / (k r + 1)`` and
``b_content = k b_quality``, which keeps the size-weighted average over the layers that ``r``
sums at ``B``. Which layers ``r`` sums is the budget rule (`BUDGET_RULES`):

- ``"ours"``: the layers being allocated, so ``B`` is exactly their average (the protected
  float layers count for nothing);
- ``"official"``: every layer of the size table, the protected ones included, as the released
  script's ``ssim2sqnr_ratio`` (computed from the whole ratio file), while each group's band is
  still on the average over its non-protected layers (the released ``intensity``). ``B`` is
  then a nominal figure: the average if the protected layers took their group's average bits.

Sweeping ``k`` and ``B`` gives the candidate configurations; the final pick needs an
evaluation of the images (``pareto.select``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mixdq_jax.allocation.milp import (
    DEFAULT_BAND,
    Allocation,
    BitProgram,
    InfeasibleBudget,
    average_bits,
    score_index,
)
from mixdq_jax.quant.registry import layer_group

# Candidate ratios k = b_content / b_quality swept by the official code.
WEIGHT_K_SWEEP: tuple[float, ...] = tuple(float(k) for k in np.linspace(0.46, 1.36, 10))
ACT_K_SWEEP: tuple[float, ...] = tuple(float(k) for k in np.linspace(0.94, 1.09, 20))
# Official candidate bit-widths per kind: (content, quality).
OFFICIAL_CANDIDATES: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "weight": ((2, 4, 8), (4, 8)),
    "act": ((4, 8), (4, 8)),
}
# How a budget is split between the groups (module docstring); "ours" is the default.
BUDGET_RULES: tuple[str, ...] = ("ours", "official")
# The released sweep's skip rule: it solves only (B, k) points with b_content in [2, 8] and
# b_quality in [4, 8] (whatever the candidates; a point no assignment reaches is skipped here).
OFFICIAL_BUDGET_RANGE: tuple[tuple[float, float], tuple[float, float]] = ((2.0, 8.0), (4.0, 8.0))


def is_content_layer(name: str) -> bool:
    """The official grouping: cross-attention and feed-forward layers change image content
    (the registry's one rule, `mixdq_jax.quant.registry.layer_group`)."""
    return layer_group(name) == "content"


def split_groups(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(content, quality)`` layer names, each sorted."""
    names = sorted(names)
    return [n for n in names if is_content_layer(n)], [n for n in names if not is_content_layer(n)]


def size_ratio(content: Iterable[str], quality: Iterable[str], sizes: Mapping[str, float]) -> float:
    """``r = P_content / P_quality`` over the layers being allocated."""
    p_content = math.fsum(sizes[n] for n in content)
    p_quality = math.fsum(sizes[n] for n in quality)
    if p_content <= 0 or p_quality <= 0:
        raise ValueError("both groups need layers with positive size to split a budget")
    return p_content / p_quality


def check_budget_rule(rule: str) -> str:
    if rule not in BUDGET_RULES:
        raise ValueError(f"budget rule {rule!r}: expected one of {', '.join(BUDGET_RULES)}")
    return rule


def split_budget(total: float, *, k: float, ratio: float) -> tuple[float, float]:
    """``(b_content, b_quality)`` for overall average ``total`` and ``k = b_content/b_quality``."""
    if not (k > 0 and ratio > 0):
        raise ValueError(f"k ({k!r}) and the size ratio ({ratio!r}) must be positive")
    b_quality = total * (1.0 + ratio) / (k * ratio + 1.0)
    return k * b_quality, b_quality


def budget_sweep(target: float, *, delta: float = 0.3, num: int = 10) -> tuple[float, ...]:
    """The official ``B_j``: ``num`` budgets evenly in ``[target - delta, target]``, ending at
    ``target`` (so ``num=1`` is just the target)."""
    if num < 1 or delta < 0:
        raise ValueError(f"need num >= 1 and delta >= 0, got num={num!r}, delta={delta!r}")
    return tuple(float(b) for b in np.linspace(target, target - delta, num)[::-1])


def most_sensitive(
    sensitivity: Mapping[str, Sequence[float]], *, fraction: float, bits: int
) -> list[str]:
    """The ``ceil(fraction * N)`` layers with the lowest score at ``bits`` (most sensitive).

    Applied per group with that group's metric (SSIM for content, SQNR for quality), so the
    two incomparable scales never compete. On the official SDXL-turbo activation data,
    ``fraction=0.01`` at 8 bits picks exactly the official 9 protected layers (5 content +
    4 quality); at 4 bits only the 4 quality ones agree.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction!r} must be in [0, 1]")
    i = score_index(bits)
    count = math.ceil(fraction * len(sensitivity) - 1e-9)
    return sorted(sorted(sensitivity, key=lambda n: (sensitivity[n][i], n))[:count])


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One (B, k) point of Algorithm 1: both groups' solutions."""

    target: float  # overall average-bit budget B_j
    k: float
    content: Allocation
    quality: Allocation

    @property
    def bits(self) -> dict[str, int]:
        return {**self.content.bits, **self.quality.bits}

    def avg_bits(self, sizes: Mapping[str, float]) -> float:
        return average_bits(self.bits, sizes)


class GroupAllocator:
    """Both groups' compiled programs, and Algorithm 1 on top of them.

    ``sizes`` holds every layer (protected ones included: the ``"official"`` budget rule counts
    them in ``r``); the sensitivities hold only the layers to allocate.
    """

    def __init__(
        self,
        *,
        content_sensitivity: Mapping[str, Sequence[float]],
        quality_sensitivity: Mapping[str, Sequence[float]],
        sizes: Mapping[str, float],
        content_candidates: Sequence[int],
        quality_candidates: Sequence[int],
        mip_rel_gap: float = 0.0,
        budget_rule: str = "ours",
    ) -> None:
        self.budget_rule = check_budget_rule(budget_rule)
        overlap = sorted(set(content_sensitivity) & set(quality_sensitivity))
        if overlap:
            raise ValueError(f"layers in both groups: {overlap}")
        self.content = BitProgram(
            content_sensitivity, sizes, candidates=content_candidates, mip_rel_gap=mip_rel_gap
        )
        self.quality = BitProgram(
            quality_sensitivity, sizes, candidates=quality_candidates, mip_rel_gap=mip_rel_gap
        )
        if budget_rule == "official":
            # every layer of the size table, protected ones too (released ``ssim2sqnr_ratio``)
            self.ratio = size_ratio(*split_groups(sizes), sizes)
        else:
            self.ratio = size_ratio(self.content.names, self.quality.names, sizes)

    def group_budgets(self, target: float, k: float) -> tuple[float, float]:
        return split_budget(target, k=k, ratio=self.ratio)

    def in_range(self, target: float, k: float) -> bool:
        """Whether the sweep solves (B, k): both group budgets in their candidates' bit range
        (``"ours"``), or in `OFFICIAL_BUDGET_RANGE` as the released loop checks
        (``"official"``)."""
        b_content, b_quality = self.group_budgets(target, k)
        if self.budget_rule == "official":
            (c_lo, c_hi), (q_lo, q_hi) = OFFICIAL_BUDGET_RANGE
        else:
            (c_lo, c_hi), (q_lo, q_hi) = self.content.bit_range, self.quality.bit_range
        return c_lo <= b_content <= c_hi and q_lo <= b_quality <= q_hi

    def allocate(self, target: float, k: float, *, band: float = DEFAULT_BAND) -> Candidate:
        """Split ``target`` by ``k`` and solve both groups."""
        b_content, b_quality = self.group_budgets(target, k)
        return Candidate(
            target=float(target),
            k=float(k),
            content=self.content.solve(b_content, band=band),
            quality=self.quality.solve(b_quality, band=band),
        )

    def sweep(
        self,
        *,
        targets: Sequence[float],
        ks: Sequence[float],
        band: float = DEFAULT_BAND,
    ) -> list[Candidate]:
        """Every in-range (B, k) combination, solved; out-of-range or infeasible ones skipped."""
        out = []
        for target in targets:
            for k in ks:
                if not self.in_range(target, k):
                    continue
                try:
                    out.append(self.allocate(target, k, band=band))
                except InfeasibleBudget:
                    continue
        return out
