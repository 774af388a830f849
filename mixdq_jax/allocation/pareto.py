"""Pareto frontier over candidate configurations, the paper's baselines, and the final pick.

Sec. 5.1 / Fig. 8 of the paper compare the integer program with two baselines at the same
average bit-width: *random* bit-widths and *naive sorting* (repeatedly lower the least
sensitive layer). The final configuration is chosen among the frontier candidates by an
evaluation of generated images; that evaluation is a callable here so that it can be plugged
in without this module knowing about models.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from mixdq_jax.allocation.milp import DEFAULT_BAND, score_index

T = TypeVar("T")


def pareto_front(
    items: Sequence[T],
    *,
    bits: Callable[[T], float],
    score: Callable[[T], float],
) -> list[T]:
    """Items no other item beats (fewer or equal bits and a higher or equal score, one strictly).

    Returned sorted by bits; exact duplicates (same bits and score) keep the first.
    """
    points = [(float(bits(x)), float(score(x)), i) for i, x in enumerate(items)]
    # Sort by bits ascending, then score descending: an item is on the frontier iff its score
    # beats every score seen before it.
    points.sort(key=lambda p: (p[0], -p[1], p[2]))
    front: list[T] = []
    best = -np.inf
    for _, s, i in points:
        if s > best:
            front.append(items[i])
            best = s
    return front


def select(
    items: Sequence[T], metric: Callable[[T], float], *, minimize: bool = True
) -> tuple[T, list[float]]:
    """The item with the best ``metric`` (e.g. pixel MSE vs FP, lower is better) and all scores.

    Ties keep the first item, so pass candidates in a deliberate order (e.g. fewest bits).
    """
    if not items:
        raise ValueError("no candidates to select from")
    scores = [float(metric(x)) for x in items]
    if any(np.isnan(scores)):
        raise ValueError(f"metric returned NaN for candidates {np.flatnonzero(np.isnan(scores))}")
    pick = int(np.argmin(scores) if minimize else np.argmax(scores))
    return items[pick], scores


def _steps(candidates: Sequence[int]) -> tuple[int, ...]:
    cands = tuple(sorted({int(c) for c in candidates}))
    if not cands:
        raise ValueError("no candidate bit-widths")
    return cands


def random_allocation(
    sizes: Mapping[str, float],
    *,
    candidates: Sequence[int],
    budget: float,
    band: float = DEFAULT_BAND,
    seed: int = 0,
    max_moves: int = 100_000,
) -> dict[str, int]:
    """The "pure random" baseline: random bit-widths whose average lands in the budget band.

    Draw each layer's bits uniformly from ``candidates``, then move randomly chosen layers one
    candidate step down (or up) until the size-weighted average is in
    ``[budget - band, budget + band]``, preferring moves that do not overshoot the band.
    """
    cands = _steps(candidates)
    names = sorted(sizes)
    rng = np.random.default_rng(seed)
    w = np.array([sizes[n] for n in names], dtype=np.float64)
    w = w / w.sum()
    level = rng.integers(0, len(cands), size=len(names))
    values = np.array(cands, dtype=np.float64)
    lo, hi = budget - band, budget + band
    if hi < cands[0] or lo > cands[-1]:
        raise ValueError(
            f"budget {budget:g} +- {band:g} is outside the achievable range "
            f"[{cands[0]}, {cands[-1]}]"
        )
    for _ in range(max_moves):
        avg = float(w @ values[level])
        if lo <= avg <= hi:
            return {n: cands[int(lv)] for n, lv in zip(names, level, strict=True)}
        step = -1 if avg > hi else 1
        movable = np.flatnonzero((level + step >= 0) & (level + step < len(cands)))
        new_avg = avg + w[movable] * (values[level[movable] + step] - values[level[movable]])
        safe = movable[(new_avg >= lo) if step < 0 else (new_avg <= hi)]
        pool = safe if safe.size else movable
        i = rng.choice(pool)
        level[i] += step
    raise ValueError(f"random allocation did not reach the band after {max_moves} moves")


def naive_sorting(
    sensitivity: Mapping[str, Sequence[float]],
    sizes: Mapping[str, float],
    *,
    candidates: Sequence[int],
    budget: float,
    band: float = DEFAULT_BAND,
) -> dict[str, int]:
    """The "naive sorting" baseline: start at the highest bits, repeatedly lower the layer
    whose score one candidate step down is highest (the least sensitive), until the average
    is at most ``budget + band``. It ignores layer sizes, which the integer program weighs.
    """
    cands = _steps(candidates)
    if budget + band < cands[0]:
        raise ValueError(f"budget {budget:g} is below the lowest candidate {cands[0]}")
    names = sorted(sensitivity)
    total = math.fsum(sizes[n] for n in names)
    level = {n: len(cands) - 1 for n in names}
    spent = math.fsum(sizes[n] * cands[-1] for n in names)

    def entry(n: str) -> tuple[float, str]:
        # heapq pops the smallest: negate so the highest score one step down comes first.
        return (-sensitivity[n][score_index(cands[level[n] - 1])], n)

    heap = [entry(n) for n in names if level[n] > 0]
    heapq.heapify(heap)
    while spent > (budget + band) * total and heap:
        _, pick = heapq.heappop(heap)
        spent -= sizes[pick] * (cands[level[pick]] - cands[level[pick] - 1])
        level[pick] -= 1
        if level[pick] > 0:
            heapq.heappush(heap, entry(pick))
    return {n: cands[level[n]] for n in names}
