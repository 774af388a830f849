"""The integer program of MixDQ Sec. 3.3, for one layer group.

One-hot choice ``c[i, b]`` per layer over the candidate bit-widths, maximise the summed
sensitivity ``sum c[i, b] * S[i, b]`` subject to the official two-sided budget band
``(B - band) * sum(w) <= sum c[i, b] * b * w_i <= (B + band) * sum(w)``. The band makes the
result land near the budget instead of far below it, which a plain ``<=`` allows when the
sensitivities saturate.

The program is compiled once per group with cvxpy parameters for the band, so a sweep over
budgets (Algorithm 1) re-solves without re-compiling. HiGHS solves it to a zero relative gap
(``mip_rel_gap=0``; its absolute gap stays at the 1e-6 default), so the answer is the proven
optimum, not one within 1e-4 of it. The released code solves with SCIP through OR-tools, whose
default relative gap is 1e-4: about 0.04 on the summed SSIM of SDXL's 420 content layers and
about 3 dB on the summed SQNR of its quality layers. That is why it returns the released weight
configurations over windows of budgets where the proven optimum scores higher
(tests/allocation/test_official_reproduction.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from mixdq_jax.official_format import SENSITIVITY_BITS

DEFAULT_BAND = 0.02


class InfeasibleBudget(ValueError):
    """No bit assignment of the group lands in the budget band."""


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """One group's solution: bits per layer and what they cost and score."""

    bits: Mapping[str, int]
    avg_bits: float  # size-weighted average bit-width of the group
    sensitivity: float  # summed sensitivity of the chosen bits
    budget: float
    band: float
    solve_seconds: float


def score_index(bits: int) -> int:
    """Position of ``bits`` in a sensitivity list ``(s@2, s@4, s@8)``."""
    try:
        return SENSITIVITY_BITS.index(int(bits))
    except ValueError:
        raise ValueError(
            f"bit-width {bits!r} has no sensitivity score (measured at {SENSITIVITY_BITS})"
        ) from None


def average_bits(bits: Mapping[str, int], sizes: Mapping[str, float]) -> float:
    """Size-weighted average bit-width of the layers in ``bits``."""
    w = np.array([sizes[n] for n in bits], dtype=np.float64)
    b = np.array([bits[n] for n in bits], dtype=np.float64)
    return float((w * b).sum() / w.sum())


def summed_sensitivity(
    bits: Mapping[str, int], sensitivity: Mapping[str, Sequence[float]]
) -> float:
    """Sum over layers of the sensitivity score at the chosen bit-width."""
    return float(math.fsum(sensitivity[n][score_index(b)] for n, b in bits.items()))


def _check_inputs(
    sensitivity: Mapping[str, Sequence[float]],
    sizes: Mapping[str, float],
    candidates: Sequence[int],
) -> tuple[list[str], tuple[int, ...]]:
    if not sensitivity:
        raise ValueError("no layers to allocate")
    cands = tuple(sorted({int(c) for c in candidates}))
    if not cands:
        raise ValueError("no candidate bit-widths")
    for c in cands:
        score_index(c)
    names = sorted(sensitivity)
    missing = [n for n in names if n not in sizes]
    if missing:
        raise ValueError(f"{len(missing)} layers have no size: {missing}")
    bad = [n for n in names if not all(math.isfinite(v) for v in sensitivity[n])]
    if bad:
        raise ValueError(f"non-finite sensitivity for layers: {bad}")
    return names, cands


def _dominance_pairs(sizes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetry-breaking pairs ``(a, b)`` for which some optimum has ``bits[a] >= bits[b]``.

    Layers of equal size are interchangeable in the budget, and SDXL has only a handful of
    distinct layer sizes, so without this the solver explores many equivalent assignments
    (tens of seconds on some budgets). Swapping the bits of two equal-size layers keeps the
    budget, and it does not lower the objective when ``a`` gains at least as much as ``b``
    from every step up (``a`` dominates ``b``). Ordering each size class by a linear extension
    of dominance and linking every layer to the next one it dominates keeps an optimum
    feasible: repeatedly swapping violating pairs reaches one that satisfies all the links.
    """
    gains = np.diff(scores, axis=1)  # score gained by each step up to the next candidate
    first: list[int] = []
    second: list[int] = []
    for size in np.unique(sizes):
        members = np.flatnonzero(sizes == size)
        # Dominance implies a larger total gain, so this order extends it; ties keep index order.
        order = sorted(members, key=lambda i: (-gains[i].sum(), *(-gains[i]), i))
        for pos, a in enumerate(order):
            for b in order[pos + 1 :]:
                if np.all(gains[a] >= gains[b]):
                    first.append(int(a))
                    second.append(int(b))
                    break
    return np.array(first, dtype=np.int64), np.array(second, dtype=np.int64)


class BitProgram:
    """The compiled integer program of one layer group; ``solve`` per budget, to a zero
    relative gap by default (``mip_rel_gap``, a HiGHS option)."""

    def __init__(
        self,
        sensitivity: Mapping[str, Sequence[float]],
        sizes: Mapping[str, float],
        *,
        candidates: Sequence[int],
        mip_rel_gap: float = 0.0,
        time_limit: float | None = None,
    ) -> None:
        self.names, self.candidates = _check_inputs(sensitivity, sizes, candidates)
        self._sensitivity = {n: tuple(sensitivity[n]) for n in self.names}
        self._sizes = {n: float(sizes[n]) for n in self.names}
        self._options: dict[str, float] = {"mip_rel_gap": float(mip_rel_gap)}
        if time_limit is not None:
            self._options["time_limit"] = float(time_limit)

        idx = [score_index(c) for c in self.candidates]
        scores = np.array([[self._sensitivity[n][i] for i in idx] for n in self.names])
        # Score relative to each layer's best candidate: the same optimum, but the objective is
        # the (small) loss instead of a large sum, so the solver's gap tolerances are meaningful.
        self._offset = float(scores.max(axis=1).sum())
        scores = scores - scores.max(axis=1, keepdims=True)
        w = np.array([self._sizes[n] for n in self.names])
        w_norm = w / w.sum()  # budget in average bits: well scaled for the solver
        cand = np.array(self.candidates, dtype=np.float64)

        self._choice = cp.Variable((len(self.names), len(self.candidates)), boolean=True)
        self._lo = cp.Parameter()
        self._hi = cp.Parameter()
        avg = w_norm @ (self._choice @ cand)
        constraints = [cp.sum(self._choice, axis=1) == 1, avg >= self._lo, avg <= self._hi]
        first, second = _dominance_pairs(w, scores)
        if first.size:
            # "bits[first] >= bits[second]" as cumulative indicators (tighter than on bits).
            for t in range(1, len(self.candidates)):
                at_least = cp.sum(self._choice[:, t:], axis=1)
                constraints.append(at_least[first] >= at_least[second])
        objective = cp.Maximize(cp.sum(cp.multiply(self._choice, scores)))
        self._problem = cp.Problem(objective, constraints)

    @property
    def bit_range(self) -> tuple[int, int]:
        """Achievable average bit-widths lie in ``[min candidate, max candidate]``."""
        return self.candidates[0], self.candidates[-1]

    def solve(self, budget: float, *, band: float = DEFAULT_BAND) -> Allocation:
        """Best bits with the group's average bit-width in ``[budget - band, budget + band]``."""
        if not (math.isfinite(budget) and math.isfinite(band) and band >= 0):
            raise ValueError(f"budget {budget!r} and band {band!r} must be finite, band >= 0")
        lo_bits, hi_bits = self.bit_range
        if budget + band < lo_bits or budget - band > hi_bits:
            raise InfeasibleBudget(
                f"budget {budget:g} +- {band:g} average bits is outside the achievable range "
                f"[{lo_bits}, {hi_bits}] for candidates {list(self.candidates)} "
                f"({len(self.names)} layers)"
            )
        self._lo.value = budget - band
        self._hi.value = budget + band
        start = time.perf_counter()
        self._problem.solve(solver=cp.HIGHS, **self._options)
        seconds = time.perf_counter() - start
        status = self._problem.status
        if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
            raise InfeasibleBudget(
                f"no assignment of {list(self.candidates)} bits lands in "
                f"[{budget - band:g}, {budget + band:g}] average bits for these "
                f"{len(self.names)} layers (achievable range [{lo_bits}, {hi_bits}]; the band "
                "is narrower than the step one layer makes): widen the band"
            )
        if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE) or self._choice.value is None:
            raise RuntimeError(f"HiGHS ended with status {status!r}")
        picks = np.argmax(self._choice.value, axis=1)
        bits = {n: self.candidates[int(p)] for n, p in zip(self.names, picks, strict=True)}
        return Allocation(
            bits=bits,
            avg_bits=average_bits(bits, self._sizes),
            sensitivity=summed_sensitivity(bits, self._sensitivity),
            budget=float(budget),
            band=float(band),
            solve_seconds=seconds,
        )


def allocate_group(
    sensitivity: Mapping[str, Sequence[float]],
    sizes: Mapping[str, float],
    *,
    candidates: Sequence[int],
    budget: float,
    band: float = DEFAULT_BAND,
) -> Allocation:
    """One-shot form of ``BitProgram(...).solve(budget, band=band)``."""
    return BitProgram(sensitivity, sizes, candidates=candidates).solve(budget, band=band)
