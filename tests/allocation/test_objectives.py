"""Allocation objectives and the Fig. 8 baselines, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mixdq_jax.allocation import BitProgram, naive_sorting, perturb, random_allocation
from mixdq_jax.allocation.objectives import (
    OBJECTIVES,
    noise_power,
    predicted_noise,
    program_scores,
)
from mixdq_jax.methods import AllocationOptions

# Two equal-size layers, scores at (2, 4, 8) bits in dB. A budget of 6 bits puts one at 4.
# Summed dB: A@4 + B@8 = 10 + 60 = 70 > A@8 + B@4 = 25 + 40 = 65, so the official objective
# lowers A, adding 10^-1 of the output power as noise (vs 10^-2.5 + 10^-4 the other way).
DB = {"a": (0.0, 10.0, 25.0), "b": (20.0, 40.0, 60.0)}
SIZES = {"a": 1.0, "b": 1.0}


def _solve(objective: str) -> dict[str, int]:
    scores = program_scores(DB, "sqnr", objective)
    return dict(BitProgram(scores, SIZES, candidates=(4, 8)).solve(6.0, band=0.0).bits)


def test_official_sums_db_and_noise_sums_power():
    assert _solve("official") == {"a": 4, "b": 8}
    assert _solve("noise") == {"a": 8, "b": 4}
    # the noise objective's choice has the lower summed noise power, by the formula
    assert 10**-2.5 + 10**-4 < 10**-1 + 10**-6


def test_program_scores():
    assert program_scores(DB, "sqnr", "official") == DB
    noise = program_scores(DB, "sqnr", "noise")
    total = 1.0 + 10**-2  # each layer's noise at its worst bit-width (2 bits)
    assert noise["a"] == pytest.approx(tuple(-(10 ** (-v / 10)) / total for v in DB["a"]))
    ssim = {"x": (0.2, 0.9, 0.99), "y": (0.5, 0.8, 1.0)}
    loss = program_scores(ssim, "ssim", "noise")
    # 1 - SSIM scaled by the summed worst loss (0.8 + 0.5): a positive scale of the official
    assert loss["x"] == pytest.approx(tuple((v - 1.0) / 1.3 for v in ssim["x"]))
    with pytest.raises(ValueError, match="objective 'mse'"):
        program_scores(DB, "sqnr", "mse")
    with pytest.raises(ValueError, match="objective 'mse'"):
        AllocationOptions(objective="mse")
    assert set(OBJECTIVES) == {"official", "noise"}


def test_predicted_noise():
    bits = {"a": 8, "b": 4, "c": 16}  # float layers add nothing
    sens = {"a": DB["a"], "b": DB["b"], "c": (0.0, 0.0, 0.0)}
    assert predicted_noise(bits, sens) == pytest.approx(10**-2.5 + 10**-4)
    assert noise_power(30.0) == pytest.approx(1e-3)


def _groups(n: int = 60):
    rng = np.random.default_rng(0)
    names = [f"l{i:02d}" for i in range(n)]
    sizes = {m: float(rng.choice([1.0, 4.0, 9.0])) for m in names}
    cands = {m: ((2, 4, 8) if i % 3 == 0 else (4, 8)) for i, m in enumerate(names)}
    return names, sizes, cands


def _avg(bits, sizes) -> float:
    return sum(sizes[m] * b for m, b in bits.items()) / sum(sizes.values())


def test_baselines_respect_per_layer_candidates():
    names, sizes, cands = _groups()
    bits = random_allocation(sizes, candidates=cands, budget=5.0, band=0.05, seed=3)
    assert abs(_avg(bits, sizes) - 5.0) <= 0.05
    assert all(bits[m] in cands[m] for m in names)
    sens = {m: (float(i), float(i) + 10, float(i) + 20) for i, m in enumerate(names)}
    naive = naive_sorting(sens, sizes, candidates=cands, budget=5.0, band=0.05)
    assert _avg(naive, sizes) <= 5.05
    assert all(naive[m] in cands[m] for m in names)
    with pytest.raises(ValueError, match="no candidate bit-widths"):
        random_allocation(sizes, candidates={"l00": (4, 8)}, budget=5.0)


def test_perturb_changes_a_fifth_and_keeps_the_budget():
    names, sizes, cands = _groups()
    start = random_allocation(sizes, candidates=cands, budget=5.0, band=0.05, seed=1)
    out = perturb(start, sizes, candidates=cands, budget=5.0, band=0.05, fraction=0.2, seed=7)
    changed = [m for m in names if out[m] != start[m]]
    # ceil(0.2 * 60) = 12 layers get another candidate; rebalancing moves only those (it may
    # move one back to its old value), so between 1 and 12 layers end up changed
    assert 0 < len(changed) <= math.ceil(0.2 * len(names))
    assert abs(_avg(out, sizes) - 5.0) <= 0.05
    assert all(out[m] in cands[m] for m in names)
    assert out == perturb(start, sizes, candidates=cands, budget=5.0, band=0.05, seed=7)
    with pytest.raises(ValueError, match="not among its candidates"):
        perturb({**start, "l01": 2}, sizes, candidates=cands, budget=5.0)
