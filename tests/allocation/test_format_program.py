"""The one-hot format program: a hand example, brute force on random problems, budgets in
several resources, and refused budgets."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mixdq_jax.allocation.formats import (
    FormatProgram,
    budget_limit,
    format_losses,
    parse_budget,
)
from mixdq_jax.allocation.milp import InfeasibleBudget

FORMATS = ("float", "w8a8", "w4a8")


def _hand():
    # a: float 10 ms; w8a8 saves 4 ms for loss 1; w4a8 saves 6 ms for loss 5
    # b: float 10 ms; w8a8 saves 2 ms for loss 1; w4a8 saves 5 ms for loss 2
    losses = {"a": {"float": 0, "w8a8": 1, "w4a8": 5}, "b": {"float": 0, "w8a8": 1, "w4a8": 2}}
    latency = {"a": {"float": 10, "w8a8": 6, "w4a8": 4}, "b": {"float": 10, "w8a8": 8, "w4a8": 5}}
    return losses, latency


def test_hand_example_known_optimum():
    losses, latency = _hand()
    prog = FormatProgram(losses, {"latency": latency})
    assert prog.float_cost("latency") == 20 and prog.cheapest("latency") == 9
    # 20 ms: nothing to save, all float
    assert dict(prog.solve({"latency": 20}).formats) == {"a": "float", "b": "float"}
    # 16 ms: a at w8a8 (loss 1, 16 ms) beats b at w4a8 (loss 2, 15 ms)
    got = prog.solve({"latency": 16})
    assert dict(got.formats) == {"a": "w8a8", "b": "float"}
    assert got.loss == 1 and got.costs["latency"] == 16
    # 12 ms: a w8a8 + b w4a8 = 11 ms, loss 3 (a w4a8 + b w8a8 = 12 ms costs loss 6)
    got = prog.solve({"latency": 12})
    assert dict(got.formats) == {"a": "w8a8", "b": "w4a8"} and got.loss == 3
    # 9 ms: only the cheapest of each
    assert dict(prog.solve({"latency": 9}).formats) == {"a": "w4a8", "b": "w4a8"}


def test_infeasible_budget_is_refused_with_the_cheapest_cost():
    losses, latency = _hand()
    prog = FormatProgram(losses, {"latency": latency})
    with pytest.raises(InfeasibleBudget, match=r"cheapest format per layer sums to 9 \(0.450"):
        prog.solve({"latency": 8.5})
    with pytest.raises(ValueError, match="no costs"):
        prog.solve({"bytes": 1})


def test_jointly_infeasible_budgets_are_refused():
    losses = {"a": {"float": 0, "x": 1, "y": 1}}
    costs = {"latency": {"a": {"float": 10, "x": 1, "y": 10}},
             "bytes": {"a": {"float": 10, "x": 10, "y": 1}}}  # fmt: skip
    prog = FormatProgram(losses, costs)
    assert prog.solve({"latency": 5}).formats["a"] == "x"
    assert prog.solve({"bytes": 5}).formats["a"] == "y"
    with pytest.raises(InfeasibleBudget, match="every budget at once"):
        prog.solve({"latency": 5, "bytes": 5})


def _brute(losses, costs, limits, allowed):
    names = sorted(losses)
    best = None
    for combo in itertools.product(FORMATS, repeat=len(names)):
        if any(f not in allowed.get(n, FORMATS) for n, f in zip(names, combo, strict=True)):
            continue
        tot = {r: sum(costs[r][n][f] for n, f in zip(names, combo, strict=True)) for r in costs}
        if any(tot[r] > limits[r] + 1e-9 for r in limits):
            continue
        loss = sum(losses[n][f] for n, f in zip(names, combo, strict=True))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, combo)
    return best


def test_random_programs_match_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(15):
        names = [f"l{i}" for i in range(5)]
        losses = {n: {"float": 0.0, "w8a8": rng.uniform(0, 1), "w4a8": rng.uniform(0, 3)}
                  for n in names}  # fmt: skip
        costs = {
            r: {n: {"float": 1.0 + rng.uniform(0, 2), "w8a8": rng.uniform(0.3, 1.5),
                    "w4a8": rng.uniform(0.2, 1.2)} for n in names}
            for r in ("latency", "bytes")
        }  # fmt: skip
        allowed = {"l0": ("float", "w8a8")} if trial % 2 else {}
        prog = FormatProgram(losses, costs, allowed=allowed)
        limits = {"latency": prog.float_cost("latency") * rng.uniform(0.35, 0.9)}
        if trial % 3 == 0:
            limits["bytes"] = prog.float_cost("bytes") * rng.uniform(0.5, 0.9)
        want = _brute(losses, costs, limits, allowed)
        if want is None:
            with pytest.raises(InfeasibleBudget):
                prog.solve(limits)
            continue
        got = prog.solve(limits)
        assert math.isclose(got.loss, want[0], rel_tol=1e-7, abs_tol=1e-9)
        assert all(got.costs[r] <= limits[r] + 1e-7 for r in limits)


def test_fixed_costs_and_allowed_formats():
    losses, latency = _hand()
    prog = FormatProgram(losses, {"latency": latency}, fixed={"latency": 5},
                         allowed={"a": ("float",)})  # fmt: skip
    assert prog.float_cost("latency") == 25 and prog.cheapest("latency") == 20
    got = prog.solve({"latency": 20})
    assert got.formats["a"] == "float" and got.formats["b"] == "w4a8"
    assert got.costs["latency"] == 20


def test_losses_from_the_format_sweep():
    """1 - SSIM for content layers, the noise power 10^(-SQNR/10) for quality layers, each
    group scaled by its total at every layer's worst format."""
    got = format_losses(
        {"c1": {"w8a8": 0.99, "w4a8": 0.9}, "c2": {"w8a8": 0.98, "w4a8": 0.95}},
        {"q1": {"w8a8": 30.0, "w4a8": 10.0}},
    )
    assert got["c1"] == pytest.approx({"float": 0, "w8a8": 0.01 / 0.15, "w4a8": 0.1 / 0.15})
    assert got["c2"] == pytest.approx({"float": 0, "w8a8": 0.02 / 0.15, "w4a8": 0.05 / 0.15})
    assert got["q1"] == pytest.approx({"float": 0, "w8a8": 1e-3 / 0.1, "w4a8": 1.0})


def test_parse_budget():
    assert parse_budget("latency=0.6") == ("latency", 0.6, "fraction")
    assert parse_budget("size=4x") == ("bytes", 4.0, "times")
    assert parse_budget("bops=8X") == ("bops", 8.0, "times")
    losses, latency = _hand()
    prog = FormatProgram(losses, {"latency": latency})
    assert budget_limit(prog, "latency", 0.6, "fraction") == pytest.approx(12)
    assert budget_limit(prog, "latency", 4, "times") == pytest.approx(5)
    for bad in ("latency", "speed=0.5", "latency=fast", "size=0.5x", "latency=-1"):
        with pytest.raises(ValueError, match="--budget"):
            parse_budget(bad)
