"""Formats chosen by measured latency on the testbed (issue 27), against every uniform format.

    .venv/bin/python benchmarks/format_search_testbed.py --out runs/format_search

1. The per-layer cost table of the testbed UNet at ``--batch`` (default 64: at batch 1 a
   testbed layer is a few microseconds, all dispatch) on this machine, with the additivity
   check (whole UNet per uniform format vs the table's sum, and the fitted correction).
2. The recipe's calibration and the format sweep (float, fp8, w8a8, w4a8, w4a16), then the
   one-hot program at each ``--budgets`` fraction of the float UNet's latency.
3. Every row (each uniform format, each searched budget): the whole UNet's measured latency
   through the deployed path at the table's batch (median of ``--repeats``, the rows measured
   in two interleaved passes and the lower median kept, so a burst of other load on a shared
   machine hurts no row more than another), and its images on ``--num-eval`` held-out test
   captions vs the float model's (SSIM, image MSE), fake-quantized as the sweep measures.

Writes OUT/costs.json, OUT/summary.json, OUT/summary.md and OUT/quality_vs_latency.png.
Resumable in its expensive parts (the cost table, calibration and sweep).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mixdq_jax.allocation.milp import InfeasibleBudget
from mixdq_jax.deploy.layer_costs import (
    check_additivity,
    cost_table,
    predicted_ms,
    unet_latency_for,
    write_table,
)
from mixdq_jax.io_utils import atomic_write_json, atomic_write_text
from mixdq_jax.metrics import ssim_global
from mixdq_jax.quant.layer_formats import parse_formats
from mixdq_jax.recipe import RecipeConfig
from mixdq_jax.recipe.format_search import (
    FormatSearch,
    format_spec,
    predicted_latency,
    search_formats,
)
from mixdq_jax.recipe.run import Recipe
from mixdq_jax.testbed import calibration_captions, data
from mixdq_jax.testbed.evaluate import generate, load_testbed

FORMATS = "float,fp8,w8a8,w4a8,w4a16"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6])
    p.add_argument("--num-eval", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--table-repeats", type=int, default=5)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pipe = load_testbed()
    config = pipe.unet.config
    latent = data.SIZE // pipe.vae_scale_factor
    costs_path = args.out / "costs.json"
    table = cost_table(config, formats=parse_formats(FORMATS), batch=args.batch,
                       latent=latent, repeats=args.table_repeats, out=costs_path)  # fmt: skip
    if "fit" not in table:
        check_additivity(config, table, repeats=args.repeats, progress=True)
        write_table(costs_path, table)
    table_seconds = table.get("seconds")

    captions = data.sample_scenes(args.num_eval, seed=2024, split="test").captions
    recipe = Recipe(pipe, args.out / "run", RecipeConfig(
        calib_prompts=tuple(calibration_captions(32)), select_prompts=tuple(captions[:4]),
        batch_size=32, chunk=16))  # fmt: skip
    rows: dict[str, dict] = {}
    for fmt in parse_formats(FORMATS):
        rows[f"uniform {fmt.name}"] = {"formats": {n: fmt.name for n in recipe.layers.names}}
    refused: dict[str, str] = {}
    for b in args.budgets:
        search = FormatSearch(budgets=(f"latency={b}",), costs=costs_path)
        try:
            chosen = search_formats(recipe, search)
        except InfeasibleBudget as err:  # what this device cannot do is a result too
            refused[f"search latency={b}"] = str(err)
            print(f"latency={b}: refused: {err}", file=sys.stderr, flush=True)
            continue
        rows[f"search latency={b}"] = {"formats": dict(chosen.formats), "budget": b,
                                       "protected": list(chosen.protected)}  # fmt: skip

    symmetric = recipe.config.preset.symmetric_weights
    ranges = recipe.run.act_ranges()
    reference = generate(pipe, captions, steps=1, batch=32)
    for row in rows.values():
        spec = format_spec(row["formats"], symmetric_weights=symmetric)
        images = generate(pipe, captions, steps=1, batch=32,
                          qconfig=spec.to_qconfig(recipe.splits, ranges))  # fmt: skip
        row["ssim_vs_fp"] = float(np.mean(ssim_global(images * 255.0, reference * 255.0)))
        row["mse_vs_fp"] = float(np.mean((images - reference) ** 2))
        summed = predicted_ms(table, row["formats"])
        row["summed_ms"] = summed
        row["predicted_ms"] = predicted_latency(summed, table.get("fit"))
        counts: dict[str, int] = {}
        for f in row["formats"].values():
            counts[f] = counts.get(f, 0) + 1
        row["counts"] = counts

    s = table["settings"]
    kw = dict(batch=s["batch"], latent=tuple(s["latent"]), seq_len=s["seq_len"],
              repeats=args.repeats, float_dtype=s["float_dtype"],
              backend=s["kernel_backend"])  # fmt: skip
    names = list(rows)
    for order in (names, names[::-1]):  # two interleaved passes: the lower median is kept
        for name in order:
            ms = unet_latency_for(config, {k: v for k, v in rows[name]["formats"].items()
                                           if v != "float"}, **kw)  # fmt: skip
            rows[name]["measured_ms"] = min(rows[name].get("measured_ms", float("inf")), ms)
            print(f"{name}: {ms:.2f} ms", file=sys.stderr, flush=True)
    float_ms = rows["uniform float"]["measured_ms"]
    for row in rows.values():
        row["measured_fraction"] = row["measured_ms"] / float_ms
        if "budget" in row:
            row["within_10pct_of_budget"] = abs(row["measured_fraction"] / row["budget"] - 1) <= 0.1
            row["dominates_uniform"] = all(
                row["ssim_vs_fp"] >= other["ssim_vs_fp"] for other in rows.values()
                if "budget" not in other and other["measured_ms"] <= row["measured_ms"]
            )  # fmt: skip

    summary = {"batch": args.batch, "latent": latent, "num_eval": args.num_eval,
               "device": table.get("device"), "table_seconds": table_seconds,
               "unet": table.get("unet"), "fit": table.get("fit"),
               "wall_seconds": time.time() - start, "refused": refused,
               # a uniform row's formats are its name; a searched row keeps its choice
               "rows": {k: {kk: vv for kk, vv in v.items() if kk != "formats" or "budget" in v}
                        for k, v in rows.items()}}  # fmt: skip
    atomic_write_json(args.out / "summary.json", summary)
    atomic_write_text(args.out / "summary.md", _markdown(summary))
    _plot(summary, args.out / "quality_vs_latency.png")
    print(_markdown(summary))
    return 0


def _markdown(summary: dict) -> str:
    lines = [
        f"Testbed, batch {summary['batch']}, latent {summary['latent']}x{summary['latent']}, "
        f"{summary['device']}; SSIM / MSE vs float on {summary['num_eval']} test captions.",
        "",
        "| row | layers per format | predicted ms | measured ms | of float | SSIM vs FP | "
        "image MSE |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in summary["rows"].items():
        counts = ", ".join(f"{f} {n}" for f, n in sorted(r["counts"].items()))
        lines.append(
            f"| {name} | {counts} | {r['predicted_ms']:.2f} | {r['measured_ms']:.2f} | "
            f"{r['measured_fraction']:.3f} | {r['ssim_vs_fp']:.4f} | {r['mse_vs_fp']:.3g} |"
        )
    for name, why in summary.get("refused", {}).items():
        lines.append(f"| {name} | refused: {why} | | | | | |")
    fit = summary.get("fit")
    if fit:
        lines += ["", f"Additive model: measured ~= {fit['a']:.3f} x sum + {fit['b_ms']:.2f} ms "
                      f"(residual rms {fit['residual_rms_ms']:.2f} ms over {fit['configs']} "
                      f"uniform formats; mean measured/sum {fit['mean_ratio']:.3f})."]  # fmt: skip
    return "\n".join(lines) + "\n"


def _plot(summary: dict, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in summary["rows"].items():
        marker = "*" if "budget" in r else "o"
        for ax, key in zip(axes, ("ssim_vs_fp", "mse_vs_fp"), strict=True):
            ax.scatter(r["measured_fraction"], r[key], marker=marker, s=80 if marker == "*" else 40)
            ax.annotate(name.replace("uniform ", ""), (r["measured_fraction"], r[key]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    axes[0].set_ylabel("SSIM vs float")
    axes[1].set_ylabel("image MSE vs float")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("measured UNet latency / float")
        ax.grid(alpha=0.3)
    fig.suptitle(f"testbed, batch {summary['batch']} ({summary['device']}): * = searched")
    fig.tight_layout()
    buf = path.with_suffix(".tmp.png")
    fig.savefig(buf, dpi=120)
    buf.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
