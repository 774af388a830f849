"""The study's report: the table (report.md, metrics.json), the image grid and the plots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.evaluation.run import REPORT_COLUMNS
from mixdq_jax.io_utils import atomic_write_json, atomic_write_text
from mixdq_jax.methods import RECONSTRUCTION_METHODS
from mixdq_jax.study.config import ABLATION, RECONSTRUCTION_TABLE, StudyConfig
from mixdq_jax.testbed import data
from mixdq_jax.testbed.evaluate import save_grid


def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "-"
    return str(x)


def _row(label: str, title: str, m: Mapping[str, Any]) -> str:
    if "skipped" in m or not m:
        return f"| {label} | {title} | n/a | | | | | | | | |"
    mb = m.get("unet_mb")
    return (
        f"| {label} | {title} | {m['weight_avg_bits']:.2f} | "
        f"{_fmt(m['act_effective_bits'], 2)} | {len(m['act_float_layers'])} | "
        f"{_fmt(m['content_score'])} | {_fmt(m['frechet_distance'], 2)} | "
        f"{_fmt(m['ssim_vs_fp'])} | {_fmt(m['psnr_vs_fp'], 1)} | "
        f"{'-' if mb is None else f'{mb:.2f}'} | {_fmt(m.get('compute_opt'), 2)} |"
    )


_HEADER = [
    "| setting | method | W bits | A bits (eff.) | A float | content score | Frechet dist. | "
    "SSIM vs FP | PSNR vs FP | UNet MB | BOPs saving |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def _paper_table(config: StudyConfig, results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Table 1 with the paper's metrics: only the columns some row computed."""
    rows = [("-", "float", "float")] + [
        (t.name, m.title, f"{t.name}_{m.name}") for t in config.targets for m in config.methods
    ]
    papers = {key: results.get(key, {}).get("paper") for _, _, key in rows}
    cols = [c for c in REPORT_COLUMNS if any(v and c[0] in v for v in papers.values())]
    if not cols:
        return []
    fp = papers["float"] or {}
    lines = [
        "## Table 1 with the paper's metrics",
        "",
        f"{fp.get('prompts', '?')} evaluation prompts per row (`paper_eval/<row>/`: images and "
        "metrics.json; `mixdq evaluate --prompts` computes the same); vs FP: against the float "
        "model's images on the same prompts and seeds.",
        "",
        "| setting | method | W bits | A bits (eff.) | "
        + " | ".join(c[1] for c in cols) + " | UNet MB | BOPs saving |",
        "|---|---|---|---|" + "---|" * len(cols) + "---|---|",
    ]  # fmt: skip
    for setting, title, key in rows:
        m, paper = results.get(key, {}), papers[key]
        if paper is None:
            continue
        w = "16" if key == "float" else f"{m['weight_avg_bits']:.2f}"
        a = "16" if key == "float" else _fmt(m["act_effective_bits"], 2)
        values = [_fmt(paper.get(k), d) if k in paper else "-" for k, _, d in cols]
        mb = m.get("unet_mb")
        lines.append(
            f"| {setting} | {title} | {w} | {a} | {' | '.join(values)} | "
            f"{'-' if mb is None else f'{mb:.2f}'} | {_fmt(m.get('compute_opt'), 2)} |"
        )
    return [*lines, ""]


BASELINES = ("mixdq", "naive_sorting", "random", "perturb_20")


def allocation_baselines(pareto: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """metrics.json's ``allocation_baselines``: per setting, the pick and each baseline at the
    same bits (average weight bits, image MSE vs float; random and perturbed: medians)."""
    return {
        setting: {
            name: {k: entry[name][k] for k in ("avg_bits", "image_mse")} for name in BASELINES
        }
        for setting, entry in pareto.items()
    }


def _fig8_table(pareto: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if not pareto:
        return []
    lines = [
        "## Fig. 8: the integer program against the baselines, at the same bits",
        "",
        "Weights only (activations float), the same candidates per layer (content {2, 4, 8}, "
        "quality {4, 8}), each baseline within the band of the pick's average bits; image MSE "
        "vs float on the held-out selection captions (random, perturb 20%: median of 5).",
        "",
        "| setting | MixDQ pick | naive sorting | random | perturb 20% | W bits |",
        "|---|---|---|---|---|---|",
    ]
    for setting, entry in pareto.items():
        mse = [f"{entry[name]['image_mse']:.2e}" for name in BASELINES]
        lines.append(f"| {setting} | {' | '.join(mse)} | {entry['mixdq']['avg_bits']:.2f} |")
    return [*lines, ""]


def _labels_line(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The quantizer preset and the integer program's objective every row ran with."""
    rows = [r for k, r in results.items() if k != "float" and "preset" in r]
    if not rows:
        return []
    presets = sorted({r["preset"] for r in rows})
    objectives = sorted({r["objective"] for r in rows if r.get("objective")})
    line = f"Quantizer preset: {', '.join(presets)}"
    if objectives:
        line += f"; the integer programs' objective: {', '.join(objectives)}"
    return [line + " (each row's settings: metrics.json `method_settings`).", ""]


def table(
    config: StudyConfig,
    results: Mapping[str, Mapping[str, Any]],
    seconds: float,
    pareto: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """report.md: Table 1 (every target x method, the float model first), Table 2 (the
    reconstruction baselines at W8A8, when the study has them) and Table 3 (the W8A8
    ablation, one technique added per row)."""
    lines = [
        f"# MixDQ study on {'the testbed' if config.model == 'testbed' else config.model}",
        "",
        f"Model `{config.model}`, {config.steps} step(s), {config.num_calib} calibration "
        f"captions, {config.num_select} held-out selection captions"
        + (f", {config.num_eval} held-out test captions" if config.judged else "")
        + f" (seed {config.seed}). Run time {seconds / 60:.1f} min (this "
        "run; stages found on disk are not recomputed).",
        "",
        *_labels_line(results),
        "Every row is the recipe of `mixdq quantize --target T --method M`. W bits: average "
        "weight bits. A bits (eff.): average activation bits with the float layers counted at "
        "16 (A8 targets stay at or below 8). A float: activation layers kept float. UNet MB: "
        "the UNet params as `mixdq export` stores them (packed weights, scales, zero points, "
        "column sums, BOS rows; every other param in fp16; none for FP8, which has no export). "
        "BOPs saving: the paper's Compute Opt., bit operations of one UNet forward vs FP16 "
        "(per Dense/Conv MACs x w_bits x a_bits; a layer with float activations counts 16 x "
        "16, so weight-only rows read 1.00; `mixdq_jax.evaluation.bops`).",
        "",
    ]
    methods = {m.name: m for m in config.methods}
    if config.judged:
        fp = results["float"]
        float_row = (
            f"| - | float | 16 | 16 | - | {_fmt(fp['content_score'])} | "
            f"{_fmt(fp['frechet_distance'], 2)} | 1 | - | {fp['unet_mb']:.2f} | 1.00 |"
        )
        lines += ["## Table 1: every target and method", "", *_HEADER, float_row]
        for target in config.targets:
            for method in config.methods:
                m = results.get(f"{target.name}_{method.name}", {})
                lines.append(_row(target.name, method.title, m))
        w8a8 = any(t.name == "W8A8" for t in config.targets)
        reconstruction = [n for n in RECONSTRUCTION_TABLE if n in methods]
        if w8a8 and set(reconstruction) & set(RECONSTRUCTION_METHODS):
            lines += ["", "## Table 2: reconstruction baselines at W8A8", "", *_HEADER,
                      float_row]  # fmt: skip
            for name in reconstruction:
                lines.append(_row("W8A8", methods[name].title, results.get(f"W8A8_{name}", {})))
        ablation = [n for n in ABLATION if n in methods]
        if w8a8 and ablation:
            lines += ["", "## Table 3: ablation at W8A8", "", *_HEADER, float_row]
            for name in ablation:
                m = results.get(f"W8A8_{name}", {})
                lines.append(_row("W8A8", methods[name].title, m))
    paper = _paper_table(config, results)
    if paper:
        lines += ["", *paper] if config.judged else paper
    lines += ["", *_fig8_table(pareto or {})]
    lines += [
        "Chosen bits, candidates and settings of each row: `quantize/<row>/`.",
        "",
        *(["![grid](grid.png)", ""] if config.judged else []),
        *(["![sensitivity](sensitivity.png)", ""] if config.swept else []),
        "![pareto](pareto.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(
    report: Path,
    config: StudyConfig,
    results: Mapping[str, Mapping[str, Any]],
    images: Mapping[str, np.ndarray],
    sens: Mapping[tuple[str, str], Mapping[str, tuple[float, ...]]] | None,
    pareto: Mapping[str, Mapping[str, Any]],
    seconds: float,
) -> None:
    """Write report.md, metrics.json, grid.png, sensitivity.png (``sens``: None without
    sweeps) and pareto.png."""
    import matplotlib  # noqa: PLC0415  (only the report needs it)

    matplotlib.use("Agg")
    report.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report / "report.md", table(config, results, seconds, pareto))
    metrics = {**results, "allocation_baselines": allocation_baselines(pareto)}
    atomic_write_json(report / "metrics.json", metrics)

    if config.judged:
        _grid(report, config, images)
    _plots(report, sens, pareto)


def _grid(report: Path, config: StudyConfig, images: Mapping[str, np.ndarray]) -> None:
    """Rows = methods, the same captions and seeds."""
    scenes = data.sample_scenes(config.num_eval, seed=2024, split="test")
    cols = 8
    keys = ["float"] + [
        f"{t.name}_{m}"
        for t in config.targets
        for m in ("naive", "mixdq")
        if f"{t.name}_{m}" in images
    ]
    grid = np.concatenate([images[k][:cols] for k in keys])
    captions = [f"{k}: {c}" for k in keys for c in scenes.captions[:cols]]
    save_grid(report / "grid.png", grid, captions, columns=cols)


def _plots(
    report: Path,
    sens: Mapping[tuple[str, str], Mapping[str, tuple[float, ...]]] | None,
    pareto: Mapping[str, Mapping[str, Any]],
) -> None:
    from matplotlib import pyplot as plt  # noqa: PLC0415

    if sens is not None:
        _sensitivity_plot(plt, report, sens)
    _pareto_plot(plt, report, pareto)


def _sensitivity_plot(plt: Any, report: Path, sens: Mapping[tuple[str, str], Any]) -> None:
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


def _pareto_plot(plt: Any, report: Path, pareto: Mapping[str, Mapping[str, Any]]) -> None:
    # Fig. 8: predicted noise (the sensitivity axis) and image MSE vs average weight bits
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    markers = {"naive_sorting": "x", "random": "^", "perturb_20": "+"}
    for c, (name, entry) in enumerate(pareto.items()):
        color = f"C{c}"
        pts = entry["candidates"]
        for ax, y in ((axes[0], "predicted_noise"), (axes[1], "image_mse")):
            ax.scatter(
                [p["avg_bits"] for p in pts], [p[y] for p in pts], s=8, color=color,
                alpha=0.4, label=f"{name} integer-program candidates",
            )  # fmt: skip
        for ax, y in ((axes[0], "predicted_noise"), (axes[1], "image_mse")):
            pick = entry["mixdq"]
            ax.scatter(pick["avg_bits"], pick[y], marker="*", s=90, color=color,
                       label=f"{name} MixDQ pick")  # fmt: skip
            for base, marker in markers.items():
                seeds = entry[base].get("seeds", [entry[base]])
                ax.scatter([p["avg_bits"] for p in seeds], [p[y] for p in seeds],
                           marker=marker, color=color, label=f"{name} {base}")  # fmt: skip
    axes[0].set_ylabel("summed single-layer noise power (predicted)")
    axes[1].set_ylabel("image MSE vs float (activations float)")
    for ax in axes:
        ax.set_xlabel("average weight bits")
        ax.set_yscale("log")
    axes[1].legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(report / "pareto.png", dpi=110)
    plt.close(fig)
