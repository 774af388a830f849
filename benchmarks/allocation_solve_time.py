"""Solve time of the SDXL-size bit-allocation program: ours (cvxpy + HiGHS) vs the official
formulation on OR-tools SCIP.

Problems, all on the official SDXL-turbo weight sensitivities and sizes:
- ``single_794``: one program over all 794 layers, SQNR scores, candidates {2, 4, 8};
- ``split_420_374``: the MixDQ form, content (420 layers, SSIM, {2, 4, 8}) and quality
  (374 layers, SQNR, {4, 8}) solved separately; the time is the sum of both solves.
Budgets: the released configs' per-group average bits (3.66 / 4.00 / 5.02), band +-0.02.

Ours is timed cold (build + compile + solve) and warm (re-solve of a compiled program with a new
budget, as in the Algorithm 1 sweep). The official formulation (binary c[i, b], one-hot rows,
raw-score objective, two-sided budget row) is rebuilt and solved with SCIP through
``pywraplp`` at its default relative gap (1e-4) and at gap 0. OR-tools is optional:
``pip install --target DIR --no-deps ortools==9.15.6755 protobuf==6.33.6 immutabledict==4.3.1``
then run with ``PYTHONPATH=DIR``; without it those rows are skipped with a message. OR-tools
bundles its own HiGHS build, and loading it next to highspy breaks one of them (undefined
symbols), so the SCIP timings run in a child process that never imports cvxpy.

    .venv/bin/python benchmarks/allocation_solve_time.py [--repeats 3] [--official DIR]

Prints JSON with median seconds and the objective each solver reached.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OFFICIAL = ROOT / "tests" / "data" / "mixdq_official"  # vendored official data
BAND = 0.02
BITS = (2, 4, 8)


def _scip_solve(sens, sizes, cands, budget, band, gap):
    """The official formulation, written from its description, on SCIP. Returns (objective)."""
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("SCIP")
    names = sorted(sens)
    choice = {(n, b): solver.BoolVar(f"c[{n},{b}]") for n in names for b in cands}
    for n in names:
        solver.Add(sum(choice[n, b] for b in cands) == 1)
    total = sum(sizes[n] for n in names)
    spent = sum(choice[n, b] * b * sizes[n] for n in names for b in cands)
    solver.Add(spent >= (budget - band) * total)
    solver.Add(spent <= (budget + band) * total)
    solver.Maximize(sum(choice[n, b] * sens[n][BITS.index(b)] for n in names for b in cands))
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, gap)
    status = solver.Solve(params)
    if status != pywraplp.Solver.OPTIMAL:
        raise RuntimeError(f"SCIP status {status}")
    bits = {n: next(b for b in cands if choice[n, b].solution_value() > 0.5) for n in names}
    return sum(sens[n][BITS.index(b)] for n, b in bits.items())


def _median_time(fn, repeats):
    times, value = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def _scip_worker(spec_path: Path, repeats: int) -> int:
    """Child process: time the SCIP solves of every problem in the spec file."""
    spec = json.loads(spec_path.read_text())
    sizes = spec["sizes"]
    out = {}
    for name, parts in spec["problems"].items():
        out[name] = {}
        for gap in (1e-4, 0.0):

            def scip(parts=parts, gap=gap):
                return sum(
                    _scip_solve(
                        p["sensitivity"], sizes, tuple(p["candidates"]), p["budget"], BAND, gap
                    )
                    for p in parts
                )

            seconds, value = _median_time(scip, repeats)
            out[name][f"scip_gap{gap:g}"] = {"median_s": seconds, "objective": value}
    print(json.dumps(out))
    return 0


def _scip_rows(problems: dict, sizes: dict, repeats: int) -> dict:
    spec = {
        "sizes": sizes,
        "problems": {
            name: [{"sensitivity": s, "candidates": list(c), "budget": b} for s, c, b in parts]
            for name, parts in problems.items()
        },
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(spec, f)
        f.flush()
        done = subprocess.run(
            [sys.executable, __file__, "--scip-worker", f.name, "--repeats", str(repeats)],
            check=True,
            capture_output=True,
            text=True,
        )
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--official", type=Path, default=DEFAULT_OFFICIAL, help=f"default: {DEFAULT_OFFICIAL}"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scip-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scip_worker is not None:
        return _scip_worker(args.scip_worker, args.repeats)

    from mixdq_jax import official_format as fmt
    from mixdq_jax.allocation import BitProgram, average_bits, is_content_layer

    d = args.official
    sqnr = fmt.read_sensitivity(d / "sensitivity" / "weight_sqnr.yaml")
    ssim = fmt.read_sensitivity(d / "sensitivity" / "weight_ssim.yaml")
    sizes = fmt.read_sizes(d / "tensor_ratio" / "weight_ratio.yaml")
    content = {n: ssim[n] for n in sizes if is_content_layer(n)}
    quality = {n: sqnr[n] for n in sizes if not is_content_layer(n)}
    have_ortools = importlib.util.find_spec("ortools") is not None
    if not have_ortools:
        print(
            "ortools not installed: skipping the SCIP rows (see the module docstring)",
            file=sys.stderr,
        )

    # Each problem: list of (sensitivity, candidates, budget) solved together.
    problems = {}
    for tag in ("3.66", "4.00", "5.02"):
        released = fmt.read_bits(d / "final_config" / "weight" / f"weight_{tag}.yaml")
        problems[f"single_794@{tag}"] = [(sqnr, (2, 4, 8), average_bits(released, sizes))]
        problems[f"split_420_374@{tag}"] = [
            (grp, cands, average_bits({n: released[n] for n in grp}, sizes))
            for grp, cands in ((content, (2, 4, 8)), (quality, (4, 8)))
        ]

    results = {}
    for name, parts in problems.items():
        row = {"layers": sum(len(p[0]) for p in parts), "budgets": [p[2] for p in parts]}

        def ours_cold(parts=parts):
            return sum(
                BitProgram(s, sizes, candidates=c).solve(b, band=BAND).sensitivity
                for s, c, b in parts
            )

        compiled = [(BitProgram(s, sizes, candidates=c), b) for s, c, b in parts]
        for program, b in compiled:
            program.solve(b + 0.05, band=BAND)  # compile once, at another budget

        def ours_warm(compiled=compiled):
            return sum(p.solve(b, band=BAND).sensitivity for p, b in compiled)

        for key, fn in (("ours_cold", ours_cold), ("ours_warm", ours_warm)):
            seconds, value = _median_time(fn, args.repeats)
            row[key] = {"median_s": seconds, "objective": value}
        results[name] = row
        print(
            f"{name}: "
            + ", ".join(
                f"{k} {v['median_s']:.3f} s" for k, v in row.items() if isinstance(v, dict)
            ),
            file=sys.stderr,
        )
    if have_ortools:
        for name, rows in _scip_rows(problems, sizes, args.repeats).items():
            results[name].update(rows)
            print(
                f"{name}: " + ", ".join(f"{k} {v['median_s']:.3f} s" for k, v in rows.items()),
                file=sys.stderr,
            )
    print(json.dumps({"repeats": args.repeats, "band": BAND, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
