"""``mixdq evaluate --fail-if "lpips_vs_fp>0.1"``: a quality gate for scripts and CI.

Each condition names a metric of ``metrics.json``, an operator (``<``, ``<=``, ``>``, ``>=``,
``==``) and a bound; the flag repeats and takes comma lists. The command runs as usual and
writes ``metrics.json``; then, if any condition holds, it names each failing metric with its
value and bound and exits with `GATE_FAILED` (3), distinct from bad input (2) and bugs (1), so
a pipeline can tell "the model got worse" from "the command could not run". A metric name the
evaluation does not compute is bad input: exit 2 before any work, listing the known names.
"""

from __future__ import annotations

import argparse
import math
import operator
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GATE_FAILED = 3  # the exit code of a failed --fail-if

# the paper's evaluation (--prompts/--metrics): metric -> the --metrics entry computing it
PAPER_METRICS: dict[str, str | None] = {
    "fid": "fid",
    "clip_score": "clip",
    "clip_score_torchmetrics": "clip",
    "imagereward": "imagereward",
    "lpips_vs_fp": "lpips",
    "ssim_vs_fp": "ssim",
    "psnr_vs_fp": "psnr",
    "psnr_identical_images": "psnr",
    "storage_opt": None,  # always computed
    "compute_opt": None,
}
# the testbed evaluation (no --prompts/--metrics)
TESTBED_METRICS = ("content_score", "frechet_distance", "ssim_vs_fp", "psnr_vs_fp")
KNOWN = tuple(dict.fromkeys((*PAPER_METRICS, *TESTBED_METRICS)))

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "==": operator.eq, "<": operator.lt, ">": operator.gt,
}  # fmt: skip
_CONDITION = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|<|>)\s*(\S+?)\s*")


@dataclass(frozen=True)
class Condition:
    """``metric op bound``: the gate fails when it holds."""

    metric: str
    op: str
    bound: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"

    def holds(self, value: float) -> bool:
        return _OPS[self.op](value, self.bound)


def conditions(text: str) -> tuple[Condition, ...]:
    """The ``--fail-if`` argument type: ``"lpips_vs_fp>0.1, psnr_vs_fp<30"``."""
    out = []
    for part in (p for p in text.split(",") if p.strip()):
        match = _CONDITION.fullmatch(part)
        if match is None:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r}: expected METRIC<OP>BOUND with OP one of < <= > >= ==, "
                "e.g. lpips_vs_fp>0.1"
            )
        metric, op, bound = match.groups()
        if metric not in KNOWN:
            raise argparse.ArgumentTypeError(
                f"unknown metric {metric!r}; known: {', '.join(KNOWN)}"
            )
        try:
            value = float(bound)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: bound {bound!r} is no number") \
                from None  # fmt: skip
        if math.isnan(value):
            raise argparse.ArgumentTypeError(f"{part.strip()!r}: the bound is NaN")
        out.append(Condition(metric, op, value))
    if not out:
        raise argparse.ArgumentTypeError("expected METRIC<OP>BOUND, e.g. lpips_vs_fp>0.1")
    return tuple(out)


def add_fail_if(parser: argparse._ActionsContainer) -> None:
    parser.add_argument(
        "--fail-if", type=conditions, action="append", default=[], metavar="COND",
        help="a quality gate: exit 3 (after metrics.json is written) when a condition holds, "
        "e.g. \"lpips_vs_fp>0.1\" or \"psnr_vs_fp<30,ssim_vs_fp<0.9\"; repeatable; operators "
        f"< <= > >= ==; metrics: {', '.join(PAPER_METRICS)} (the paper's evaluation) or "
        f"{', '.join(TESTBED_METRICS)} (the testbed's)",
    )  # fmt: skip


def flatten(groups: Iterable[tuple[Condition, ...]] | None) -> tuple[Condition, ...]:
    return tuple(c for group in groups or () for c in group)


def check_paper(conds: Iterable[Condition], metrics: Iterable[str]) -> None:
    """Before any work: every gated metric is one the paper's evaluation computes with
    these ``--metrics``."""
    requested = set(metrics)
    for c in conds:
        if c.metric not in PAPER_METRICS:
            raise ValueError(
                f"--fail-if {c}: {c.metric} is not a metric of the paper's evaluation (--prompts/"
                f"--metrics); known: {', '.join(PAPER_METRICS)}"
            )
        need = PAPER_METRICS[c.metric]
        if need is not None and need not in requested:
            raise ValueError(
                f"--fail-if {c}: {c.metric} is not computed; add {need} to --metrics (now "
                f"{','.join(sorted(requested))})"
            )


def check_testbed(conds: Iterable[Condition]) -> None:
    """Before any work: every gated metric is one the testbed evaluation computes."""
    for c in conds:
        if c.metric not in TESTBED_METRICS:
            raise ValueError(
                f"--fail-if {c}: the testbed evaluation (without --prompts/--metrics) computes "
                f"{', '.join(TESTBED_METRICS)}; {c.metric} needs --prompts FILE --metrics ..."
            )


def _value(values: Mapping[str, Any], metric: str) -> float | None:
    value = values.get(metric)
    if value is None and metric == "psnr_vs_fp" and values.get("psnr_identical_images"):
        return math.inf  # every image equals the float one: PSNR is infinite
    return None if value is None else float(value)


def apply(conds: Iterable[Condition], values: Mapping[str, Any], command: str, where: str) -> int:
    """Print each failing condition (metric, value, bound) and return `GATE_FAILED`, or 0
    when none holds. A metric without a value fails too: a gate that cannot be checked must
    not pass. ``where``: the metrics file, for the message."""
    conds = list(conds)
    if not conds:
        return 0
    failed = []
    for c in conds:
        value = _value(values, c.metric)
        if value is None:
            failed.append(f"{c.metric} has no value (null in {where}), so --fail-if {c} cannot "
                          "pass")  # fmt: skip
        elif c.holds(value):
            failed.append(f"{c.metric} = {value:.6g} {c.op} {c.bound:g} (--fail-if {c})")
    if not failed:
        print(f"{command}: quality gate passed ({', '.join(map(str, conds))})", file=sys.stderr)
        return 0
    for line in failed:
        print(f"{command}: quality gate failed: {line}", file=sys.stderr)
    print(f"{command}: metrics in {where}; exit {GATE_FAILED}", file=sys.stderr)
    return GATE_FAILED


__all__ = [
    "GATE_FAILED",
    "KNOWN",
    "PAPER_METRICS",
    "TESTBED_METRICS",
    "Condition",
    "add_fail_if",
    "apply",
    "check_paper",
    "check_testbed",
    "conditions",
    "flatten",
]
