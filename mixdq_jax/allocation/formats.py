"""One search over per-layer formats: a one-hot format per layer under cost budgets.

``choice[i, f]`` picks format ``f`` for layer ``i``. The program minimises the predicted
output damage, the sum of the chosen formats' per-layer losses, subject to one upper bound per
budgeted resource (``latency``, ``bytes``, ``bops``: the sum of the chosen formats' per-layer
costs from a cost table, `mixdq_jax.deploy.layer_costs`). It is solved exactly (HiGHS, zero
relative gap) and a budget no assignment meets is refused with the cheapest achievable cost.

The loss is MixDQ's objective made one sum over both groups: the content layers' ``1 - SSIM``
and the quality layers' noise power ``10^(-SQNR/10)`` (the ``noise`` objective of
`mixdq_jax.allocation.objectives`), each group scaled by its total with every layer at its
worst format, so the two groups weigh the same; float costs nothing. MixDQ splits one bit
budget between the groups; a latency budget is one device-wide sum, so one program chooses
for both groups at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from mixdq_jax.allocation.milp import InfeasibleBudget
from mixdq_jax.allocation.objectives import noise_power

RESOURCES = ("latency", "bytes", "bops")


@dataclass(frozen=True, kw_only=True)
class FormatChoice:
    """The program's optimum: a format per layer, its summed loss, and each resource's
    summed cost (``costs``) next to its limit (``limits``)."""

    formats: Mapping[str, str]
    loss: float
    costs: Mapping[str, float]
    limits: Mapping[str, float]
    solve_seconds: float


def format_losses(
    content_ssim: Mapping[str, Mapping[str, float]],
    quality_sqnr: Mapping[str, Mapping[str, float]],
) -> dict[str, dict[str, float]]:
    """Per-layer, per-format losses from the format sweep (``float``: 0): ``1 - SSIM`` for
    content layers, the noise power for quality layers, each group scaled by its total at
    every layer's worst format (see the module docstring)."""
    overlap = sorted(set(content_ssim) & set(quality_sqnr))
    if overlap:
        raise ValueError(f"layer(s) {overlap[:10]} are in both groups")
    out: dict[str, dict[str, float]] = {}
    for scores, loss in (
        (content_ssim, lambda v: 1.0 - float(v)),
        (quality_sqnr, noise_power),
    ):
        raw = {n: {f: max(loss(v), 0.0) for f, v in s.items()} for n, s in scores.items()}
        total = math.fsum(max(v.values(), default=0.0) for v in raw.values()) or 1.0
        out.update({n: {"float": 0.0, **{f: v / total for f, v in s.items()}}
                    for n, s in raw.items()})  # fmt: skip
    return out


class FormatProgram:
    """The one-hot program over ``losses`` ``{layer: {format: loss}}`` and ``costs``
    ``{resource: {layer: {format: cost}}}``; ``allowed`` ``{layer: formats}`` restricts some
    layers (MixDQ's protected activations keep float-activation formats); ``fixed``
    ``{resource: cost}`` is what the layers outside the program add to each sum."""

    def __init__(
        self,
        losses: Mapping[str, Mapping[str, float]],
        costs: Mapping[str, Mapping[str, Mapping[str, float]]],
        *,
        allowed: Mapping[str, Sequence[str]] | None = None,
        fixed: Mapping[str, float] | None = None,
    ) -> None:
        if not losses:
            raise ValueError("no layers to choose formats for")
        unknown = sorted(set(costs) - set(RESOURCES))
        if unknown:
            raise ValueError(f"unknown resource(s) {unknown}; known: {', '.join(RESOURCES)}")
        self.names = sorted(losses)
        self.formats = sorted({f for s in losses.values() for f in s})
        self.resources = tuple(r for r in RESOURCES if r in costs)
        self.fixed = {r: float((fixed or {}).get(r, 0.0)) for r in self.resources}
        allowed = allowed or {}
        bad = sorted(set(allowed) - set(self.names))
        if bad:
            raise ValueError(f"allowed: unknown layer(s) {bad[:10]}")
        big = 0.0
        n, m = len(self.names), len(self.formats)
        loss = np.zeros((n, m))
        ok = np.zeros((n, m), dtype=bool)
        cost = {r: np.zeros((n, m)) for r in self.resources}
        for i, name in enumerate(self.names):
            for j, f in enumerate(self.formats):
                v = losses[name].get(f)
                if v is None or (name in allowed and f not in allowed[name]):
                    continue
                if not math.isfinite(v):
                    raise ValueError(f"layer {name!r}: loss of format {f!r} is {v}")
                row = []
                for r in self.resources:
                    c = costs[r].get(name, {}).get(f)
                    row.append(c)
                if any(c is None for c in row):
                    continue  # the cost table has no measurement: not a choice
                for r, c in zip(self.resources, row, strict=True):
                    if not (math.isfinite(c) and c >= 0):
                        raise ValueError(f"layer {name!r}: {r} cost of format {f!r} is {c}")
                    cost[r][i, j] = c
                loss[i, j], ok[i, j] = v, True
                big = max(big, v)
            if not ok[i].any():
                raise ValueError(
                    f"layer {name!r}: no format has both a loss and every budgeted cost "
                    f"({', '.join(self.resources)}); check the cost table covers the model"
                )
        self._loss, self._ok, self._cost = loss, ok, cost
        self._choice = cp.Variable((n, m), boolean=True)
        self._limits = {r: cp.Parameter() for r in self.resources}
        constraints = [cp.sum(self._choice, axis=1) == 1,
                       cp.sum(cp.multiply(self._choice, (~ok).astype(float))) == 0]  # fmt: skip
        for r in self.resources:
            scale = self.float_cost(r) or 1.0  # well scaled for the solver
            total = cp.sum(cp.multiply(self._choice, cost[r] / scale))
            constraints.append(total <= self._limits[r])
        self._scales = {r: self.float_cost(r) or 1.0 for r in self.resources}
        self._problem = cp.Problem(cp.Minimize(cp.sum(cp.multiply(self._choice, loss))),
                                   constraints)  # fmt: skip

    def _sum(self, r: str, pick: np.ndarray) -> float:
        return self.fixed[r] + float(self._cost[r][np.arange(len(self.names)), pick].sum())

    def float_cost(self, resource: str) -> float:
        """The resource's total with every layer in float (the budgets' reference)."""
        j = self.formats.index("float") if "float" in self.formats else None
        if j is None:
            raise ValueError("the program has no 'float' format to relate budgets to")
        return self.fixed[resource] + float(self._cost[resource][:, j].sum())

    def cheapest(self, resource: str) -> float:
        """The least achievable total of ``resource`` (each layer's cheapest allowed format;
        what a budget must at least allow)."""
        masked = np.where(self._ok, self._cost[resource], np.inf)
        return self.fixed[resource] + float(masked.min(axis=1).sum())

    def check(self, resource: str, limit: float) -> None:
        """Refuse a limit below the cheapest achievable total of ``resource``."""
        low = self.cheapest(resource)
        if not limit >= low * (1 - 1e-9):
            raise InfeasibleBudget(
                f"{resource} budget {limit:.6g} cannot be met: the cheapest format per layer "
                f"sums to {low:.6g} ({low / self.float_cost(resource):.3f} of float's "
                f"{self.float_cost(resource):.6g}); raise the budget"
            )

    def solve(self, limits: Mapping[str, float]) -> FormatChoice:
        """The least-loss assignment with every resource's total ``<= limits[resource]``."""
        missing = [r for r in limits if r not in self.resources]
        if missing:
            raise ValueError(f"budget on {missing}: the program has no costs for it")
        if not limits:
            raise ValueError("give at least one budget (latency, bytes or bops)")
        for r, lim in limits.items():
            self.check(r, lim)
        for r in self.resources:
            lim = limits.get(r, math.inf)
            scaled = (lim - self.fixed[r]) / self._scales[r]
            self._limits[r].value = min(scaled, 1e12)
        start = time.perf_counter()
        self._problem.solve(solver=cp.HIGHS, mip_rel_gap=0.0)
        seconds = time.perf_counter() - start
        if self._problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
            raise InfeasibleBudget(
                f"no assignment of formats {self.formats} meets every budget at once "
                f"({', '.join(f'{r} <= {v:.6g}' for r, v in limits.items())}); each alone "
                "is achievable: relax one"
            )
        if self._problem.status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
            raise RuntimeError(f"HiGHS ended with status {self._problem.status!r}")
        value = np.where(self._ok, self._choice.value, -np.inf)
        pick = np.argmax(value, axis=1)
        return FormatChoice(
            formats={n: self.formats[int(j)] for n, j in zip(self.names, pick, strict=True)},
            loss=float(self._loss[np.arange(len(self.names)), pick].sum()),
            costs={r: self._sum(r, pick) for r in self.resources},
            limits={r: float(v) for r, v in limits.items()},
            solve_seconds=seconds,
        )


def parse_budget(text: str) -> tuple[str, float, str]:
    """``latency=0.6`` / ``size=4x`` / ``bops=8x``: ``(resource, value, form)``; ``form``
    ``"fraction"`` (of float's total) or ``"times"`` (float's total divided by it). ``size``
    is the ``bytes`` resource."""
    key, sep, value = text.partition("=")
    key = {"size": "bytes"}.get(key.strip(), key.strip())
    if not sep or key not in RESOURCES:
        raise ValueError(
            f"--budget {text!r}: expected latency=F, size=Nx or bops=Nx (F a fraction of the "
            "float model's total, Nx a reduction factor)"
        )
    value = value.strip().lower()
    form = "times" if value.endswith("x") else "fraction"
    try:
        number = float(value[:-1] if form == "times" else value)
    except ValueError:
        raise ValueError(f"--budget {text!r}: {value!r} is not a number") from None
    if not (math.isfinite(number) and number > 0) or (form == "times" and number < 1):
        raise ValueError(f"--budget {text!r}: need a fraction > 0 or a factor >= 1x")
    return key, number, form


def budget_limit(program: FormatProgram, resource: str, value: float, form: str) -> float:
    """The absolute limit of a parsed budget on ``program``'s float total."""
    base = program.float_cost(resource)
    return base * value if form == "fraction" else base / value


__all__ = [
    "RESOURCES",
    "FormatChoice",
    "FormatProgram",
    "budget_limit",
    "format_losses",
    "parse_budget",
]
