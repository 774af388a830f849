"""The study's report: the table (report.md, metrics.json), the image grid and the plots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.io_utils import atomic_write_json, atomic_write_text
from mixdq_jax.study.config import StudyConfig
from mixdq_jax.testbed import data
from mixdq_jax.testbed.evaluate import save_grid


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "-"
    return str(x)


def table(config: StudyConfig, results: Mapping[str, Mapping[str, Any]], seconds: float) -> str:
    """report.md: one row per (setting, method), the float model first."""
    fp = results["float"]
    lines = [
        "# MixDQ study on the testbed",
        "",
        f"Model `{config.model}`, {config.steps} step(s), {config.num_calib} calibration "
        f"captions, {config.num_eval} held-out test captions (seed {config.seed}). "
        f"Run time {seconds / 60:.1f} min (this run; stages found on disk are not recomputed).",
        "",
        "UNet MB: the UNet params as `mixdq export` stores them (packed weights, scales, zero "
        "points, column sums, BOS rows; every other param in fp16).",
        "",
        "| setting | method | W bits | A bits | content score | Frechet dist. | SSIM vs FP | "
        "PSNR vs FP | UNet MB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| - | float | 16 | 16 | {_fmt(fp['content_score'])} | "
        f"{_fmt(fp['frechet_distance'], 2)} | 1 | - | {fp['unet_mb']:.2f} |",
    ]
    for setting in config.settings:
        for method in config.methods:
            m = results.get(f"{setting.name}_{method.name}", {})
            if "skipped" in m or not m:
                lines.append(f"| {setting.name} | {method.title} | n/a | | | | | | |")
                continue
            lines.append(
                f"| {setting.name} | {method.title} | {m['weight_avg_bits']:.2f} | "
                f"{_fmt(m['act_avg_bits'], 2)} | {_fmt(m['content_score'])} | "
                f"{_fmt(m['frechet_distance'], 2)} | {_fmt(m['ssim_vs_fp'])} | "
                f"{_fmt(m['psnr_vs_fp'], 1)} | {m['unet_mb']:.2f} |"
            )
    lines += [
        "",
        "Activation layers kept in float by MixDQ (top "
        f"{config.protect_fraction:.0%} per group): see `configs/`.",
        "",
        "![grid](grid.png)",
        "",
        "![sensitivity](sensitivity.png)",
        "",
        "![pareto](pareto.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(
    report: Path,
    config: StudyConfig,
    results: Mapping[str, Mapping[str, Any]],
    images: Mapping[str, np.ndarray],
    sens: Mapping[tuple[str, str], Mapping[str, tuple[float, ...]]],
    pareto: Mapping[str, Mapping[str, Any]],
    seconds: float,
) -> None:
    """Write report.md, metrics.json, grid.png, sensitivity.png and pareto.png."""
    import matplotlib  # noqa: PLC0415  (only the report needs it)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    report.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report / "report.md", table(config, results, seconds))
    atomic_write_json(report / "metrics.json", results)

    # image grid: rows = methods, same captions and seeds
    scenes = data.sample_scenes(config.num_eval, seed=2024, split="test")
    cols = 8
    keys = ["float"] + [
        f"{s.name}_{m}"
        for s in config.settings
        for m in ("naive", "mixdq")
        if f"{s.name}_{m}" in images
    ]
    grid = np.concatenate([images[k][:cols] for k in keys])
    captions = [f"{k}: {c}" for k in keys for c in scenes.captions[:cols]]
    save_grid(report / "grid.png", grid, captions, columns=cols)

    # sensitivity long tail (paper Fig. 2a): sorted per-layer SQNR at W4 and A4
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind in ("weight", "act"):
        vals = sorted(v[1] for v in sens[kind, "sqnr"].values())
        ax.plot(vals, label=f"{kind} 4-bit")
    ax.set_xlabel("layers (sorted)")
    ax.set_ylabel("SQNR of the UNet output (dB)")
    ax.set_title("Per-layer quantization sensitivity: a few layers dominate")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report / "sensitivity.png", dpi=110)
    plt.close(fig)

    # Pareto plot (paper Fig. 8)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, entry in pareto.items():
        pts = entry["candidates"]
        ax.scatter(
            [p["avg_bits"] for p in pts], [p["mse"] for p in pts], s=12,
            label=f"{name} MixDQ candidates",
        )  # fmt: skip
        for p in entry["baselines"]:
            ax.scatter(p["avg_bits"], p["mse"], marker="x", label=f"{name} {p['method']}")
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("image MSE vs float")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(report / "pareto.png", dpi=110)
    plt.close(fig)
