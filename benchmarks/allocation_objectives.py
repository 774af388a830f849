"""Which allocation objective predicts the image? (issue 13; BENCHMARKS.md "Allocation objectives")

On the testbed, with the demo's calibration and sweeps (``mixdq demo --out RUN`` first; the
stages it lacks are run here), for each weight budget (activations float, so only the weight
allocation matters) this measures many allocations:

- the integer program's candidates (Algorithm 1's (B, k) grid) under each objective of
  `mixdq_jax.allocation.objectives`,
- naive sorting (SQNR, every layer, the groups' candidates: content {2, 4, 8}, quality {4, 8}),
- random allocations (the same candidates) and "perturb 20%" of each objective's optimum,

and for each one the image MSE and SSIM vs float on the recipe's held-out selection captions
(what the recipe minimises) and the SQNR of the UNet output on the calibration data. Then:

- rank correlation (Spearman) of every objective's prediction with the measured image MSE,
  over all allocations and over those at the budget (within the band);
- the additive-noise check: measured output noise vs the sum of the single-layer noises;
- each objective's pick (lowest image MSE among its candidates, as the recipe picks) against
  naive sorting and random at the same average bits, on the held-out test captions with the
  testbed's judge.

Results go to OUT/allocations.jsonl as they are measured (a killed run resumes), then
OUT/summary.json and OUT/summary.md.

    python benchmarks/allocation_objectives.py --run runs/demo --out runs/objectives
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from scipy import stats

from mixdq_jax.allocation import (
    average_bits,
    naive_sorting,
    perturb,
    random_allocation,
    summed_sensitivity,
)
from mixdq_jax.allocation.objectives import OBJECTIVES, noise_power, predicted_noise
from mixdq_jax.api import load_pipeline
from mixdq_jax.io_utils import atomic_write_json, atomic_write_text
from mixdq_jax.methods import METHODS, AllocationContext, AllocationOptions, Target
from mixdq_jax.metrics import ssim_global
from mixdq_jax.quant.qconfig import FLOAT_BITS
from mixdq_jax.sensitivity.calibration import load_calibration
from mixdq_jax.sensitivity.evaluator import Evaluator
from mixdq_jax.study.baselines import layer_candidates
from mixdq_jax.study.config import StudyConfig
from mixdq_jax.study.run import study_recipe
from mixdq_jax.testbed.evaluate import evaluate

BUDGETS = (5.0, 4.0, 3.66)
BAND = 0.02


def _key(bits: Mapping[str, int]) -> str:
    return json.dumps(sorted(bits.items()))


def _allocations(recipe, sens, budget: float, n_random: int) -> tuple[list[dict], dict]:
    """The allocations to measure at ``budget`` and each layer's candidate bits."""
    layers, mixdq = recipe.layers, METHODS["mixdq"]
    cands = layer_candidates(recipe)
    target = Target(weight_bits=budget, act_bits=FLOAT_BITS)
    out: list[dict] = []
    for objective in OBJECTIVES:
        knobs = AllocationOptions(objective=objective)
        ctx = AllocationContext(layers=layers, knobs=knobs, target=target, scores=lambda: sens)
        for i, bits in enumerate(mixdq.allocator.weights(ctx)):
            out.append({"label": f"ilp-{objective}", "index": i, "bits": bits})
    sqnr = sens["weight", "sqnr"]
    for b in np.linspace(budget - 0.3, budget, 4):
        bits = naive_sorting(sqnr, layers.w_size, candidates=cands, budget=float(b), band=BAND)
        out.append({"label": "naive-sorting", "index": 0, "bits": bits})
    for seed in range(n_random):
        bits = random_allocation(layers.w_size, candidates=cands, budget=budget, seed=seed)
        out.append({"label": "random", "index": seed, "bits": bits})
    return out, cands


def _measure(recipe, evaluator: Evaluator, bits: Mapping[str, int]) -> dict[str, float]:
    floats = dict.fromkeys(recipe.layers.names, FLOAT_BITS)
    qc = recipe.qconfig(METHODS["mixdq"], bits, floats)
    images = recipe.render(qc)
    ref = recipe.reference()
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], qc)
    return {
        "image_mse": float(np.mean((images - ref) ** 2)),
        "image_ssim": float(np.mean(np.asarray(ssim_global(images, ref, data_range=1.0)))),
        "output_sqnr_db": float(evaluator.sqnr_db("weight", stacked)[0]),
    }


def _predictions(bits: Mapping[str, int], sens, layers) -> dict[str, float]:
    """Each objective's value for ``bits`` (as a loss: lower predicts a better image)."""
    content = {n: bits[n] for n in layers.content}
    quality = {n: bits[n] for n in layers.quality}
    ssim, sqnr = sens["weight", "ssim"], sens["weight", "sqnr"]
    return {
        "official_content_ssim": -summed_sensitivity(content, ssim),
        "official_quality_db": -summed_sensitivity(quality, sqnr),
        "sqnr_db_all": -summed_sensitivity(dict(bits), sqnr),
        "noise_quality": predicted_noise(quality, sqnr),
        "noise_all": predicted_noise(bits, sqnr),
        "avg_bits": average_bits(bits, layers.w_size),
    }


def _load(path: Path) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = row
    return done


def _spearman(rows: list[dict], predictor: str, measured: str) -> float | None:
    if len(rows) < 5:
        return None
    x = [r["pred"][predictor] for r in rows]
    y = [r["measured"][measured] for r in rows]
    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


PREDICTORS = (
    "avg_bits",
    "official_content_ssim",
    "official_quality_db",
    "sqnr_db_all",
    "noise_quality",
    "noise_all",
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--out", type=Path, default=Path("runs/objectives"))
    ap.add_argument("--random", type=int, default=30, help="random allocations per budget")
    ap.add_argument("--perturb", type=int, default=10, help="perturbed optima per objective")
    ap.add_argument("--num-eval", type=int, default=256, help="test captions for the picks")
    args = ap.parse_args()
    start = time.perf_counter()
    config = StudyConfig(run_dir=args.run)
    pipe = load_pipeline(config.model)
    recipe = study_recipe(config, pipe)
    recipe.calibrate()
    sens = recipe.sensitivities()
    layers = recipe.layers
    evaluator = Evaluator(pipe, load_calibration(recipe.run, pipe))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "allocations.jsonl"
    done = _load(log)

    def measure(budget: float, label: str, index: int, bits: Mapping[str, int]) -> dict:
        key = f"{budget:g}|{label}|{index}|{_key(bits)}"
        if key not in done:
            row = {
                "key": key, "budget": budget, "label": label, "index": index,
                "bits": dict(bits), "pred": _predictions(bits, sens, layers),
                "measured": _measure(recipe, evaluator, bits),
            }  # fmt: skip
            with log.open("a") as f:  # append-only log: a torn last line is re-measured
                f.write(json.dumps(row) + "\n")
            done[key] = row
        return done[key]

    summary: dict[str, Any] = {"budgets": {}, "seconds": None}
    for budget in BUDGETS:
        allocs, cands = _allocations(recipe, sens, budget, args.random)
        rows = []
        for i, a in enumerate(allocs):
            print(f"[{budget:g}] {i + 1}/{len(allocs)} {a['label']}", file=sys.stderr, flush=True)
            rows.append(measure(budget, a["label"], a["index"], a["bits"]))
        picks: dict[str, dict] = {}
        for objective in OBJECTIVES:
            own = [r for r in rows if r["label"] == f"ilp-{objective}"]
            picks[objective] = min(own, key=lambda r: (r["measured"]["image_mse"], r["index"]))
            for seed in range(args.perturb):
                bits = perturb(
                    picks[objective]["bits"], layers.w_size, candidates=cands,
                    budget=picks[objective]["pred"]["avg_bits"], seed=seed, band=BAND,
                )  # fmt: skip
                rows.append(measure(budget, f"perturb-{objective}", seed, bits))
        # naive sorting and random at the official pick's bits (the same bits, the same band)
        same_bits = picks["official"]["pred"]["avg_bits"]
        sqnr = sens["weight", "sqnr"]
        naive = naive_sorting(sqnr, layers.w_size, candidates=cands, budget=same_bits, band=BAND)
        naive_row = measure(budget, "naive-sorting@pick", 0, naive)
        rand = [
            measure(budget, "random@pick", s, random_allocation(
                layers.w_size, candidates=cands, budget=same_bits, band=BAND, seed=1000 + s))
            for s in range(5)
        ]  # fmt: skip
        rows += [naive_row, *rand]
        at_budget = [r for r in rows if abs(r["pred"]["avg_bits"] - budget) <= BAND + 1e-9]
        corr = {
            scope: {
                p: {m: _spearman(rs, p, m) for m in ("image_mse", "output_sqnr_db")}
                for p in PREDICTORS
            }
            for scope, rs in (("all", rows), ("at_budget", at_budget))
        }
        # additive-noise check: measured output noise vs the summed single-layer noises
        ratio = [
            noise_power(r["measured"]["output_sqnr_db"]) / r["pred"]["noise_all"] for r in rows
        ]
        pearson_log = stats.pearsonr(
            [math.log10(r["pred"]["noise_all"]) for r in rows],
            [-r["measured"]["output_sqnr_db"] / 10 for r in rows],
        ).statistic
        summary["budgets"][f"{budget:g}"] = {
            "count": len(rows),
            "count_at_budget": len(at_budget),
            "spearman": corr,
            "additive": {
                "measured_over_predicted_median": float(np.median(ratio)),
                "measured_over_predicted_q10_q90": [
                    float(np.quantile(ratio, q)) for q in (0.1, 0.9)
                ],
                "pearson_log10": float(pearson_log),
            },
            "picks": {
                **{o: {k: picks[o][k] for k in ("label", "index")} | {
                    "avg_bits": picks[o]["pred"]["avg_bits"], **picks[o]["measured"]}
                   for o in OBJECTIVES},
                "naive_sorting": {"avg_bits": naive_row["pred"]["avg_bits"],
                                  **naive_row["measured"]},
                "random_median": {
                    "avg_bits": float(np.median([r["pred"]["avg_bits"] for r in rand])),
                    **{m: float(np.median([r["measured"][m] for r in rand]))
                       for m in ("image_mse", "image_ssim", "output_sqnr_db")},
                },
            },  # fmt: skip
        }
        atomic_write_json(args.out / "summary.json", summary)

    # the picks (and naive sorting at the same bits) on held-out test captions, with the judge
    kw = dict(split="test", steps=1, num=args.num_eval, seed=0)
    float_eval = evaluate(pipe, **kw)
    floats = dict.fromkeys(layers.names, FLOAT_BITS)
    for b, entry in summary["budgets"].items():
        rows_by = {}
        for name in (*OBJECTIVES, "naive_sorting"):
            if name == "naive_sorting":
                label = "naive-sorting@pick"
                row = next(r for r in done.values() if r["budget"] == float(b)
                           and r["label"] == label)  # fmt: skip
            else:
                row = next(r for r in done.values() if r["budget"] == float(b)
                           and r["label"] == entry["picks"][name]["label"]
                           and r["index"] == entry["picks"][name]["index"])  # fmt: skip
            qc = recipe.qconfig(METHODS["mixdq"], row["bits"], floats)
            res = evaluate(pipe, reference_images=float_eval.images, qconfig=qc, **kw)
            rows_by[name] = {k: res.metrics[k] for k in ("content_score", "ssim_vs_fp",
                                                          "psnr_vs_fp", "frechet_distance")}
        entry["test_captions"] = rows_by
        atomic_write_json(args.out / "summary.json", summary)
    summary["float_test"] = {
        k: float_eval.metrics[k] for k in ("content_score", "frechet_distance")
    }
    summary["seconds"] = time.perf_counter() - start
    atomic_write_json(args.out / "summary.json", summary)
    atomic_write_text(args.out / "summary.md", _markdown(summary))
    print(_markdown(summary))
    return 0


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _markdown(summary: Mapping[str, Any]) -> str:
    lines = ["## Rank correlation with the measured image MSE (Spearman)", ""]
    lines += [
        "| budget | scope | n | " + " | ".join(PREDICTORS) + " |",
        "|---" * (3 + len(PREDICTORS)) + "|",
    ]
    for b, e in summary["budgets"].items():
        for scope in ("all", "at_budget"):
            n = e["count"] if scope == "all" else e["count_at_budget"]
            vals = [_f(e["spearman"][scope][p]["image_mse"]) for p in PREDICTORS]
            lines.append(f"| W{b} | {scope} | {n} | " + " | ".join(vals) + " |")
    lines += ["", "## Additive noise: measured output noise / sum of single-layer noises", ""]
    lines += ["| budget | median | 10%-90% | Pearson (log10) |", "|---|---|---|---|"]
    for b, e in summary["budgets"].items():
        a = e["additive"]
        q = a["measured_over_predicted_q10_q90"]
        lines.append(
            f"| W{b} | {a['measured_over_predicted_median']:.2f} | {q[0]:.2f}-{q[1]:.2f} | "
            f"{a['pearson_log10']:.3f} |"
        )
    lines += ["", "## Picks vs baselines at the same bits", ""]
    lines += [
        "| budget | allocation | W bits | image MSE (select) | SSIM (select) | content (test) "
        "| SSIM vs FP (test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for b, e in summary["budgets"].items():
        for name, p in e["picks"].items():
            t = e.get("test_captions", {}).get(name, {})
            lines.append(
                f"| W{b} | {name} | {p['avg_bits']:.3f} | {p['image_mse']:.2e} | "
                f"{p['image_ssim']:.4f} | {_f(t.get('content_score'), 3)} | "
                f"{_f(t.get('ssim_vs_fp'), 4)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
