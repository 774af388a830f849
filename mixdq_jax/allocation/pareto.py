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


Candidates = Sequence[int] | Mapping[str, Sequence[int]]


def _steps(candidates: Sequence[int]) -> tuple[int, ...]:
    cands = tuple(sorted({int(c) for c in candidates}))
    if not cands:
        raise ValueError("no candidate bit-widths")
    return cands


def _per_layer(candidates: Candidates, names: Sequence[str]) -> list[tuple[int, ...]]:
    """Each layer's sorted candidates: one set for all, or a mapping (e.g. per group: content
    layers {2, 4, 8}, quality layers {4, 8}, as the integer program gets them)."""
    if isinstance(candidates, Mapping):
        missing = [n for n in names if n not in candidates]
        if missing:
            raise ValueError(f"{len(missing)} layers have no candidate bit-widths: {missing[:5]}")
        return [_steps(candidates[n]) for n in names]
    return [_steps(candidates)] * len(names)


class _Levels:
    """Bit-widths as an index into each layer's candidates, with the size-weighted average."""

    def __init__(self, names: Sequence[str], cands: list[tuple[int, ...]], sizes, level) -> None:
        self.names, self.cands = list(names), cands
        w = np.array([sizes[n] for n in names], dtype=np.float64)
        self.w = w / w.sum()
        width = max(len(c) for c in cands)
        self.table = np.array([list(c) + [c[-1]] * (width - len(c)) for c in cands], np.float64)
        self.count = np.array([len(c) for c in cands])
        self.level = np.asarray(level, dtype=np.int64).copy()

    def average(self) -> float:
        return float(self.w @ self.table[np.arange(len(self.names)), self.level])

    def bits(self) -> dict[str, int]:
        return {n: c[int(lv)] for n, c, lv in zip(self.names, self.cands, self.level, strict=True)}

    def to_band(self, lo: float, hi: float, rng, pool: np.ndarray, max_moves: int) -> None:
        """Move random layers of ``pool`` one candidate step toward ``[lo, hi]`` until the
        average is inside, preferring moves that do not overshoot it."""
        idx = np.arange(len(self.names))
        for _ in range(max_moves):
            avg = self.average()
            if lo <= avg <= hi:
                return
            step = -1 if avg > hi else 1
            nxt = self.level[pool] + step
            movable = pool[(nxt >= 0) & (nxt < self.count[pool])]
            if not movable.size:
                raise ValueError(f"no layer can move toward the band [{lo:g}, {hi:g}]")
            cur = self.table[idx[movable], self.level[movable]]
            new = self.table[idx[movable], self.level[movable] + step]
            new_avg = avg + self.w[movable] * (new - cur)
            safe = movable[(new_avg >= lo) if step < 0 else (new_avg <= hi)]
            self.level[rng.choice(safe if safe.size else movable)] += step
        raise ValueError(f"did not reach the band [{lo:g}, {hi:g}] after {max_moves} moves")


def _check_budget(cands: list[tuple[int, ...]], budget: float, band: float) -> None:
    lo, hi = min(c[0] for c in cands), max(c[-1] for c in cands)
    if budget + band < lo or budget - band > hi:
        raise ValueError(
            f"budget {budget:g} +- {band:g} is outside the achievable range [{lo}, {hi}]"
        )


def random_allocation(
    sizes: Mapping[str, float],
    *,
    candidates: Candidates,
    budget: float,
    band: float = DEFAULT_BAND,
    seed: int = 0,
    max_moves: int = 100_000,
) -> dict[str, int]:
    """The "pure random" baseline: random bit-widths whose average lands in the budget band.

    Draw each layer's bits uniformly from its candidates, then move randomly chosen layers one
    candidate step down (or up) until the size-weighted average is in
    ``[budget - band, budget + band]``, preferring moves that do not overshoot the band.
    """
    names = sorted(sizes)
    cands = _per_layer(candidates, names)
    _check_budget(cands, budget, band)
    rng = np.random.default_rng(seed)
    levels = _Levels(names, cands, sizes, [rng.integers(0, len(c)) for c in cands])
    levels.to_band(budget - band, budget + band, rng, np.arange(len(names)), max_moves)
    return levels.bits()


def perturb(
    bits: Mapping[str, int],
    sizes: Mapping[str, float],
    *,
    candidates: Candidates,
    budget: float,
    fraction: float = 0.2,
    band: float = DEFAULT_BAND,
    seed: int = 0,
    max_moves: int = 100_000,
) -> dict[str, int]:
    """Fig. 8's "perturb 20%" baseline: ``bits`` (an optimum) with ``ceil(fraction * N)``
    random layers given another of their candidates, then those layers (all layers if they
    cannot) moved until the average is back in ``[budget - band, budget + band]``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction {fraction!r} must be in (0, 1]")
    names = sorted(bits)
    cands = _per_layer(candidates, names)
    _check_budget(cands, budget, band)
    try:
        start = [c.index(int(bits[n])) for n, c in zip(names, cands, strict=True)]
    except ValueError:
        raise ValueError("perturb: a layer's bits are not among its candidates") from None
    rng = np.random.default_rng(seed)
    levels = _Levels(names, cands, sizes, start)
    changeable = np.flatnonzero(levels.count > 1)
    count = min(math.ceil(fraction * len(names) - 1e-9), changeable.size)
    chosen = rng.choice(changeable, size=count, replace=False)
    for i in chosen:
        others = [lv for lv in range(levels.count[i]) if lv != levels.level[i]]
        levels.level[i] = rng.choice(others)
    try:
        levels.to_band(budget - band, budget + band, rng, np.sort(chosen), max_moves)
    except ValueError:
        levels.to_band(budget - band, budget + band, rng, np.arange(len(names)), max_moves)
    return levels.bits()


def naive_sorting(
    sensitivity: Mapping[str, Sequence[float]],
    sizes: Mapping[str, float],
    *,
    candidates: Candidates,
    budget: float,
    band: float = DEFAULT_BAND,
) -> dict[str, int]:
    """The "naive sorting" baseline: start at the highest bits, repeatedly lower the layer
    whose score one candidate step down is highest (the least sensitive), until the average
    is at most ``budget + band``. It ignores layer sizes, which the integer program weighs.
    """
    names = sorted(sensitivity)
    cands = dict(zip(names, _per_layer(candidates, names), strict=True))
    if budget + band < min(c[0] for c in cands.values()):
        raise ValueError(f"budget {budget:g} is below the lowest candidate")
    total = math.fsum(sizes[n] for n in names)
    level = {n: len(cands[n]) - 1 for n in names}
    spent = math.fsum(sizes[n] * cands[n][-1] for n in names)

    def entry(n: str) -> tuple[float, str]:
        # heapq pops the smallest: negate so the highest score one step down comes first.
        return (-sensitivity[n][score_index(cands[n][level[n] - 1])], n)

    heap = [entry(n) for n in names if level[n] > 0]
    heapq.heapify(heap)
    while spent > (budget + band) * total and heap:
        _, pick = heapq.heappop(heap)
        c = cands[pick]
        spent -= sizes[pick] * (c[level[pick]] - c[level[pick] - 1])
        level[pick] -= 1
        if level[pick] > 0:
            heapq.heappush(heap, entry(pick))
    return {n: cands[n][level[n]] for n in names}
