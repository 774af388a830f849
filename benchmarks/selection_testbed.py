"""The recipe's candidate pick, one pipeline call per candidate against batched chunks (issue 27,
point 5), on `mixdq quantize --model testbed --target W4A8` at its defaults.

    .venv/bin/python benchmarks/selection_testbed.py --out runs/selection

1. The command up to its sweeps (``--stop-after sensitivity``), timed, once (resumable).
2. For each way of picking, a copy of that run directory and the command again to the end of
   the picks (``--stop-after acts``), timed as a whole process: ``per_call``
   (``--selection-chunk 1``, the CPU default), ``map`` and ``vmap`` (``--selection-chunk 8``,
   ``--selection-parallel``). The per-call row runs first and again last, so drift in the
   machine's load shows.
3. Whether every way picked the same bits, and how far its candidate scores are from the
   per-call ones.

Writes OUT/summary.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from mixdq_jax.io_utils import atomic_write_json, atomic_write_text

COMMAND = ["-m", "mixdq_jax.cli", "quantize", "--model", "testbed", "--target", "W4A8"]
WAYS = {  # name: extra options
    "per_call": ["--selection-chunk", "1"],
    "map": ["--selection-chunk", "8", "--selection-parallel", "map"],
    "vmap": ["--selection-chunk", "8", "--selection-parallel", "vmap"],
}


def _run(args: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([sys.executable, *COMMAND, *args], check=True, stdout=f,
                       stderr=subprocess.STDOUT)  # fmt: skip
    return time.perf_counter() - t0


def _picks(run: Path) -> dict[str, dict]:
    """The recipe's chosen bits (``*_bits.json``) and candidate scores (``*_candidates.json``),
    by path relative to the run."""
    return {str(p.relative_to(run)): json.loads(p.read_text())
            for p in sorted(run.rglob("*.json"))
            if p.name.endswith(("_bits.json", "_candidates.json"))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    sweep_s = _run(["--run", str(base), "--stop-after", "sensitivity"], out / "base.log")
    rows = []
    for name in [*WAYS, "per_call"]:
        tag = name if not any(r["way"] == name for r in rows) else f"{name}_again"
        run = out / tag
        if run.exists():
            shutil.rmtree(run)
        shutil.copytree(base, run)
        seconds = _run(["--run", str(run), "--stop-after", "acts", *WAYS[name]],
                       out / f"{tag}.log")  # fmt: skip
        rows.append({"way": name, "run": tag, "seconds": round(seconds, 1)})
        print(f"{tag}: {seconds:.1f} s", file=sys.stderr, flush=True)
    reference = _picks(out / "per_call")
    for row in rows:
        picks = _picks(out / row["run"])
        chosen = {k: v for k, v in picks.items() if k.endswith("_bits.json")}
        row["same_bits"] = chosen == {k: v for k, v in reference.items()
                                      if k.endswith("_bits.json")}  # fmt: skip
        worst = 0.0
        for key, state in picks.items():
            ref = reference.get(key, {}).get("scores", {})
            for fp, score in state.get("scores", {}).items():
                if fp in ref and ref[fp] > 0:
                    worst = max(worst, abs(score - ref[fp]) / ref[fp])
        row["worst_score_rel_diff"] = worst
    summary = {"command": " ".join(["mixdq", *COMMAND[2:]]), "sweep_stage_s": round(sweep_s, 1),
               "rows": rows}  # fmt: skip
    atomic_write_json(out / "summary.json", summary)
    lines = [f"`{summary['command']}`: calibration and sweeps {sweep_s:.1f} s (once); then, "
             "from a copy of that run, the picks (`--stop-after acts`), a whole process each:",
             "", "| way | seconds | same bits as per-call | worst candidate score diff |",
             "| --- | --- | --- | --- |"]  # fmt: skip
    lines += [f"| {r['run']} | {r['seconds']} | {r['same_bits']} | "
              f"{100 * r['worst_score_rel_diff']:.2f}% |" for r in rows]  # fmt: skip
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
