"""The integer program against exhaustive enumeration, plus the budget split and baselines."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mixdq_jax.allocation import (
    BitProgram,
    GroupAllocator,
    InfeasibleBudget,
    allocate_group,
    most_sensitive,
    naive_sorting,
    pareto_front,
    random_allocation,
    select,
    split_budget,
)

BITS = (2, 4, 8)


def _problem(rng, n, *, repeated=False):
    """Random sizes and scores; ``repeated`` draws few distinct sizes and tied scores, like
    real UNets whose many equal-shape layers the program's symmetry breaking relies on."""
    names = [f"layer{i}" for i in range(n)]
    if repeated:
        sizes = {m: float(rng.choice([1.0, 2.0, 3.5])) for m in names}
        sens = {m: tuple(float(v) for v in rng.integers(0, 3, size=3)) for m in names}
    else:
        sizes = {m: float(rng.lognormal(0.0, 1.0)) for m in names}
        # Scores need not be monotone in bits: the program must not rely on it.
        sens = {m: tuple(float(v) for v in rng.normal(0.0, 1.0, size=3)) for m in names}
    return names, sizes, sens


def _brute_force(names, sizes, sens, cands, lo, hi):
    """Best (objective, avg) over every assignment with the average in [lo, hi], or None."""
    w = np.array([sizes[m] for m in names])
    best = None
    for combo in itertools.product(cands, repeat=len(names)):
        avg = float(w @ np.array(combo, dtype=float) / w.sum())
        if not (lo - 1e-9 <= avg <= hi + 1e-9):
            continue
        obj = sum(sens[m][BITS.index(b)] for m, b in zip(names, combo, strict=True))
        if best is None or obj > best[0]:
            best = (obj, avg)
    return best


@pytest.mark.parametrize("seed", range(48))
def test_milp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    cands = [(2, 4, 8), (4, 8), (2, 8), (2, 4)][seed % 4]
    names, sizes, sens = _problem(rng, n, repeated=seed % 2 == 1)
    budget = float(rng.uniform(min(cands), max(cands)))
    band = float(rng.choice([0.02, 0.2, 0.6]))
    expected = _brute_force(names, sizes, sens, cands, budget - band, budget + band)
    program = BitProgram(sens, sizes, candidates=cands)
    if expected is None:
        with pytest.raises(InfeasibleBudget, match="widen the band"):
            program.solve(budget, band=band)
        return
    got = program.solve(budget, band=band)
    assert got.sensitivity == pytest.approx(expected[0], abs=1e-7)
    assert budget - band - 1e-7 <= got.avg_bits <= budget + band + 1e-7
    assert set(got.bits) == set(names) and set(got.bits.values()) <= set(cands)
    # The reported numbers are those of the returned bits (independent recomputation).
    w = np.array([sizes[m] for m in names])
    b = np.array([got.bits[m] for m in names], dtype=float)
    assert got.avg_bits == pytest.approx(float(w @ b / w.sum()))
    assert got.sensitivity == pytest.approx(sum(sens[m][BITS.index(got.bits[m])] for m in names))


@pytest.mark.parametrize("seed", range(4))
def test_many_equal_size_layers(seed):
    """12 layers in 3 size classes: the symmetry breaking must keep the true optimum."""
    rng = np.random.default_rng(100 + seed)
    names, sizes, sens = _problem(rng, 12, repeated=True)
    sens = {
        m: tuple(v + float(rng.normal(0, 0.1)) * (seed % 2) for v in s) for m, s in sens.items()
    }
    program = BitProgram(sens, sizes, candidates=(4, 8))
    for budget in (4.5, 5.5, 6.5, 7.5):
        best = _brute_force(names, sizes, sens, (4, 8), budget - 0.1, budget + 0.1)
        if best is None:
            with pytest.raises(InfeasibleBudget):
                program.solve(budget, band=0.1)
        else:
            assert program.solve(budget, band=0.1).sensitivity == pytest.approx(best[0], abs=1e-7)


def test_program_is_reused_across_budgets():
    rng = np.random.default_rng(7)
    names, sizes, sens = _problem(rng, 5)
    program = BitProgram(sens, sizes, candidates=(2, 4, 8))
    for budget in (2.5, 4.0, 6.0, 7.5):
        got = program.solve(budget, band=0.5)
        best = _brute_force(names, sizes, sens, (2, 4, 8), budget - 0.5, budget + 0.5)
        assert got.sensitivity == pytest.approx(best[0], abs=1e-7)


def test_infeasible_budget_names_range():
    sizes = {"a": 1.0, "b": 2.0}
    sens = {"a": (0.0, 1.0, 2.0), "b": (0.0, 1.0, 2.0)}
    with pytest.raises(InfeasibleBudget, match=r"achievable range \[4, 8\]"):
        allocate_group(sens, sizes, candidates=(4, 8), budget=3.5, band=0.02)
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
        allocate_group(sens, sizes, candidates=(2, 4, 8), budget=8.5, band=0.02)


def test_bad_inputs():
    with pytest.raises(ValueError, match="no size"):
        BitProgram({"a": (1.0, 2.0, 3.0)}, {}, candidates=(4, 8))
    with pytest.raises(ValueError, match="non-finite"):
        BitProgram({"a": (1.0, float("nan"), 3.0)}, {"a": 1.0}, candidates=(4, 8))
    with pytest.raises(ValueError, match="bit-width 3"):
        BitProgram({"a": (1.0, 2.0, 3.0)}, {"a": 1.0}, candidates=(3, 8))


def test_split_budget_keeps_average_and_ratio():
    p_content, p_quality = 3.0, 1.25
    ratio = p_content / p_quality
    for total, k in [(4.0, 0.6), (7.7, 1.0), (5.0, 1.3)]:
        b_content, b_quality = split_budget(total, k=k, ratio=ratio)
        assert b_content / b_quality == pytest.approx(k)
        assert (b_content * p_content + b_quality * p_quality) / (p_content + p_quality) == (
            pytest.approx(total)
        )


def test_sweep_skips_out_of_range():
    rng = np.random.default_rng(3)
    _, sizes, sens = _problem(rng, 8)
    content = {m: s for i, (m, s) in enumerate(sens.items()) if i < 4}
    quality = {m: s for i, (m, s) in enumerate(sens.items()) if i >= 4}
    alloc = GroupAllocator(
        content_sensitivity=content,
        quality_sensitivity=quality,
        sizes=sizes,
        content_candidates=(2, 4, 8),
        quality_candidates=(4, 8),
    )
    ks = (0.3, 0.8, 1.0, 2.5)
    got = alloc.sweep(targets=(4.5, 6.0), ks=ks, band=1.0)
    for cand in got:
        b_content, b_quality = split_budget(cand.target, k=cand.k, ratio=alloc.ratio)
        assert 2 <= b_content <= 8 and 4 <= b_quality <= 8
        assert abs(cand.content.avg_bits - b_content) <= 1.0 + 1e-7
        assert abs(cand.quality.avg_bits - b_quality) <= 1.0 + 1e-7
    in_range = [(t, k) for t in (4.5, 6.0) for k in ks if alloc.in_range(t, k)]
    assert (4.5, 0.3) not in in_range and (6.0, 2.5) not in in_range  # b_quality out of [4, 8]
    assert {(c.target, c.k) for c in got} <= set(in_range) and got


def test_pareto_front_matches_definition():
    rng = np.random.default_rng(0)
    pts = [
        (float(b), float(s))
        for b, s in zip(rng.integers(2, 9, 60), rng.normal(size=60), strict=True)
    ]
    front = pareto_front(pts, bits=lambda p: p[0], score=lambda p: p[1])

    def dominated(p):
        return any(q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1]) for q in pts)

    assert sorted(front) == sorted({p for p in pts if not dominated(p)})
    assert [p[0] for p in front] == sorted(p[0] for p in front)


def test_select():
    items = ["a", "bb", "ccc"]
    assert select(items, len) == ("a", [1.0, 2.0, 3.0])
    assert select(items, len, minimize=False)[0] == "ccc"
    with pytest.raises(ValueError, match="NaN"):
        select(items, lambda x: float("nan"))


def test_random_allocation_lands_in_band():
    rng = np.random.default_rng(1)
    _, sizes, _ = _problem(rng, 200)
    w = np.array([sizes[m] for m in sorted(sizes)])
    for seed, budget in [(0, 3.0), (1, 5.0), (2, 7.5)]:
        bits = random_allocation(sizes, candidates=(2, 4, 8), budget=budget, band=0.05, seed=seed)
        avg = float(w @ np.array([bits[m] for m in sorted(sizes)]) / w.sum())
        assert budget - 0.05 <= avg <= budget + 0.05
        assert set(bits.values()) <= {2, 4, 8}
        assert bits == random_allocation(
            sizes, candidates=(2, 4, 8), budget=budget, band=0.05, seed=seed
        )


def test_naive_sorting_lowers_least_sensitive_first():
    sizes = {"a": 1.0, "b": 1.0, "c": 1.0}
    sens = {"a": (0.0, 0.9, 1.0), "b": (0.0, 0.5, 1.0), "c": (0.0, 0.7, 1.0)}
    # One step 8->4 of one layer brings the average to 6.67: "a" (highest score at 4) goes.
    assert naive_sorting(sens, sizes, candidates=(4, 8), budget=6.7, band=0.0) == {
        "a": 4,
        "b": 8,
        "c": 8,
    }
    assert naive_sorting(sens, sizes, candidates=(4, 8), budget=5.4, band=0.0) == {
        "a": 4,
        "b": 8,
        "c": 4,
    }


def test_most_sensitive():
    sens = {f"l{i}": (float(i), float(-i), 0.0) for i in range(10)}
    assert most_sensitive(sens, fraction=0.2, bits=2) == ["l0", "l1"]
    assert most_sensitive(sens, fraction=0.15, bits=4) == ["l8", "l9"]  # ceil(1.5) = 2
    assert most_sensitive(sens, fraction=0.0, bits=4) == []
