"""The whole MixDQ study on one model: calibrate, sweep, allocate, evaluate, report.

This is what ``make demo`` runs on the built-in testbed (``mixdq demo``). Every stage writes
its results into the run directory as it goes and is skipped when they are already there, so a
killed study resumes where it stopped:

    RUN/calib/                  calibration ranges and float references
    RUN/sensitivity/            per-layer sensitivities, official YAML format
    RUN/configs/<method>.yaml   the bit-width configurations (official format)
    RUN/eval/<method>.json      testbed metrics of each evaluated configuration
    RUN/report/                 report.md, grid.png, sensitivity.png, pareto.png

Methods follow the rows of the paper's Tables 1 and 3: float, naive PTQ (uniform bits),
SQNR-only mixed precision (one integer program over all layers with SQNR, as Yang et al.),
MixDQ without BOS-aware quantization, and full MixDQ (metric-decoupled groups, Algorithm 1,
top-1% activation layers protected, BOS-aware).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.io_utils import atomic_write_json, atomic_write_text
from mixdq_jax.official_format import read_bits, write_bits

FLOAT = 16


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One row group of the paper's tables: a weight budget and an activation bit-width."""

    name: str
    weight_bits: float  # average weight bits (uniform when an integer)
    act_bits: int  # 8 or 16


DEFAULT_SETTINGS = (
    Setting(name="W8A8", weight_bits=8, act_bits=8),
    Setting(name="W5A8", weight_bits=5, act_bits=8),
    Setting(name="W4A8", weight_bits=4, act_bits=8),
    Setting(name="W4A16", weight_bits=4, act_bits=16),
    Setting(name="W3.66A16", weight_bits=3.66, act_bits=16),
)
METHODS = ("naive", "sqnr_only", "mixdq_no_bos", "mixdq")
METHOD_TITLES = {
    "float": "float",
    "naive": "naive PTQ",
    "sqnr_only": "SQNR-only MP",
    "mixdq_no_bos": "MixDQ w/o BOS",
    "mixdq": "MixDQ",
}


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """What the study runs. Defaults fit the testbed in minutes on a laptop CPU."""

    model: str = "testbed"
    run_dir: Path = Path("runs/demo")
    num_calib: int = 16
    num_eval: int = 64
    num_select: int = 8  # prompts used to pick among Pareto candidates (MSE vs float)
    steps: int = 1
    seed: int = 0
    settings: tuple[Setting, ...] = DEFAULT_SETTINGS
    protect_fraction: float = 0.01
    chunk: int = 16


# ---------------------------------------------------------------------------------- stages
def _stage(name: str) -> None:
    print(f"[mixdq demo] {name}", flush=True)


def _calibrate(pipe: Any, config: StudyConfig) -> None:
    from mixdq_jax.quant.calibrate import CalibConfig, calibrate  # noqa: PLC0415
    from mixdq_jax.testbed import calibration_captions  # noqa: PLC0415

    size = _image_size(pipe)
    calib = CalibConfig(
        prompts=tuple(calibration_captions(config.num_calib)),
        num_inference_steps=config.steps,
        height=size,
        width=size,
        seed=config.seed,
        batch_size=16,
    )
    calibrate(pipe, calib, config.run_dir)


def _image_size(pipe: Any) -> int:
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    size = pipe.unet.config.sample_size or 8
    return (size[0] if isinstance(size, tuple) else size) * factor


def _sensitivities(pipe: Any, config: StudyConfig) -> dict[tuple[str, str], dict]:
    from mixdq_jax.sensitivity import SweepConfig, sweep  # noqa: PLC0415

    return sweep(pipe, config.run_dir, SweepConfig(chunk=config.chunk))


@dataclass(frozen=True, kw_only=True)
class _Layers:
    names: list[str]
    content: list[str]
    quality: list[str]
    w_size: dict[str, float]
    a_size: dict[str, float]


def _layers(pipe: Any) -> _Layers:
    from mixdq_jax.quant.quantize import unet_layers  # noqa: PLC0415

    layers = unet_layers(pipe)
    return _Layers(
        names=[layer.name for layer in layers],
        content=[layer.name for layer in layers if layer.group == "content"],
        quality=[layer.name for layer in layers if layer.group == "quality"],
        w_size={layer.name: float(layer.weight_params) for layer in layers},
        a_size={layer.name: float(layer.input_size) for layer in layers},
    )


def _mixdq_weight_candidates(sens, layers: _Layers, target: float) -> list:
    """Algorithm 1's (B, k) sweep for weights, reduced to its Pareto front."""
    from mixdq_jax.allocation import (  # noqa: PLC0415
        WEIGHT_K_SWEEP,
        GroupAllocator,
        budget_sweep,
        pareto_front,
    )

    alloc = GroupAllocator(
        content_sensitivity={n: sens["weight", "ssim"][n] for n in layers.content},
        quality_sensitivity={n: sens["weight", "sqnr"][n] for n in layers.quality},
        sizes=layers.w_size,
        content_candidates=(2, 4, 8),
        quality_candidates=(4, 8),
    )
    targets = budget_sweep(target, delta=0.3, num=10) if target < 8 else (8.0,)
    cands = alloc.sweep(targets=targets, ks=WEIGHT_K_SWEEP if target < 8 else (1.0,))
    if not cands:
        raise ValueError(f"MixDQ allocation: no feasible (B, k) for a {target}-bit budget")
    return pareto_front(
        cands,
        bits=lambda c: c.avg_bits(layers.w_size),
        score=lambda c: c.content.sensitivity + c.quality.sensitivity / 100.0,
    )


def _sqnr_only_weights(sens, layers: _Layers, target: float) -> dict[str, int]:
    from mixdq_jax.allocation import BitProgram  # noqa: PLC0415

    program = BitProgram(
        {n: sens["weight", "sqnr"][n] for n in layers.names}, layers.w_size, candidates=(2, 4, 8)
    )
    return dict(program.solve(target).bits)


def _protected_acts(sens, layers: _Layers, fraction: float) -> set[str]:
    """Top ``fraction`` most sensitive activation layers of each group at 4 bits."""
    from mixdq_jax.allocation import most_sensitive  # noqa: PLC0415

    content = {n: sens["act", "ssim"][n] for n in layers.content}
    quality = {n: sens["act", "sqnr"][n] for n in layers.quality}
    return set(most_sensitive(content, fraction=fraction, bits=4)) | set(
        most_sensitive(quality, fraction=fraction, bits=4)
    )


# ---------------------------------------------------------------------------------- study
def run_study(config: StudyConfig) -> Path:
    """Run (or resume) the study; returns the report folder."""
    from mixdq_jax.pipeline import load_pipeline  # noqa: PLC0415
    from mixdq_jax.quant import QuantSpec  # noqa: PLC0415
    from mixdq_jax.quant.calibrate import load_act_ranges  # noqa: PLC0415
    from mixdq_jax.quant.quantize import layer_splits, unet_layers  # noqa: PLC0415
    from mixdq_jax.testbed.evaluate import evaluate  # noqa: PLC0415

    start = time.perf_counter()
    run = Path(config.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(config.model, scheduler=None if config.steps == 1 else "LCMScheduler")
    _stage("1/5 calibration")
    _calibrate(pipe, config)
    ranges = load_act_ranges(run)
    _stage("2/5 sensitivity sweeps (weights and activations, every layer, 2/4/8 bits)")
    sens = _sensitivities(pipe, config)
    layers = _layers(pipe)
    splits = layer_splits(unet_layers(pipe))
    protected = _protected_acts(sens, layers, config.protect_fraction)

    # One quantized pipeline per quantizer structure; configurations are data.
    def quant_pipe(bos_aware: bool):
        spec = QuantSpec(weight_bits=8, act_bits=8, bos_aware=bos_aware)
        return pipe.with_quantization(_context, spec.to_qconfig(splits, ranges))

    qpipes = {True: quant_pipe(True), False: quant_pipe(False)}

    def qconfig(w_bits: Mapping[str, int], a_bits: Mapping[str, int], bos: bool):
        spec = QuantSpec(weight_bits=dict(w_bits), act_bits=dict(a_bits), bos_aware=bos)
        return spec.to_qconfig(splits, ranges)

    select_prompts = _select_prompts(config)

    _stage("3/5 allocation")
    configs: dict[str, dict[str, Any]] = {}
    pareto_data: dict[str, Any] = {}
    for setting in config.settings:
        act_uniform = {n: setting.act_bits for n in layers.names}
        act_mixdq = {n: (FLOAT if n in protected else setting.act_bits) for n in layers.names}
        if setting.act_bits == FLOAT:
            act_mixdq = act_uniform
        wb = setting.weight_bits
        rows: dict[str, tuple[dict[str, int] | None, dict[str, int], bool]] = {}
        rows["naive"] = (
            ({n: int(wb) for n in layers.names} if float(wb).is_integer() else None),
            act_uniform,
            True,
        )
        rows["sqnr_only"] = (
            _cached_bits(
                run, f"{setting.name}_sqnr_only", lambda wb=wb: _sqnr_only_weights(sens, layers, wb)
            ),
            act_uniform,
            True,
        )
        mixdq_bits = _cached_bits(
            run,
            f"{setting.name}_mixdq",
            lambda wb=wb, act=act_mixdq, setting=setting: _pick_mixdq(
                _mixdq_weight_candidates(sens, layers, wb),
                qpipes[True],
                qconfig,
                act,
                select_prompts,
                config,
                pareto_data,
                setting.name,
                sens,
                layers,
            ),
        )
        rows["mixdq_no_bos"] = (mixdq_bits, act_mixdq, False)
        rows["mixdq"] = (mixdq_bits, act_mixdq, True)
        configs[setting.name] = rows

    _stage("4/5 evaluation on held-out test captions")
    float_eval = _cached_eval(
        run,
        "float",
        lambda: evaluate(
            pipe, split="test", steps=config.steps, num=config.num_eval, seed=config.seed
        ),
    )
    results: dict[str, dict[str, Any]] = {"float": float_eval["metrics"]}
    images: dict[str, np.ndarray] = {"float": float_eval["images"]}
    for setting in config.settings:
        for method, (w_bits, a_bits, bos) in configs[setting.name].items():
            key = f"{setting.name}_{method}"
            if w_bits is None:
                results[key] = {"skipped": "no uniform bit-width for this budget"}
                continue
            qp = dataclasses.replace(qpipes[bos], qconfig=qconfig(w_bits, a_bits, bos))
            out = _cached_eval(
                run,
                key,
                lambda qp=qp: evaluate(
                    qp,
                    split="test",
                    steps=config.steps,
                    num=config.num_eval,
                    seed=config.seed,
                    reference_images=float_eval["images"],
                ),
            )
            metrics = dict(out["metrics"])
            metrics["weight_avg_bits"] = _avg(w_bits, layers.w_size)
            metrics["act_avg_bits"] = (
                _avg({n: b for n, b in a_bits.items() if b < FLOAT}, layers.a_size)
                if setting.act_bits < FLOAT
                else FLOAT
            )
            metrics["act_float_layers"] = sum(b >= FLOAT for b in a_bits.values())
            metrics["unet_mb"] = _unet_megabytes(pipe, w_bits)
            results[key] = metrics
            images[key] = out["images"]

    _stage("5/5 report")
    report = run / "report"
    _write_report(
        report,
        config,
        results,
        images,
        sens,
        layers,
        pareto_data,
        pipe,
        time.perf_counter() - start,
    )
    return report


def _context(qconfig):
    from mixdq_jax.quant.apply import fake_quant_context  # noqa: PLC0415

    return fake_quant_context(qconfig)


def _select_prompts(config: StudyConfig) -> list[str]:
    from mixdq_jax.testbed import calibration_captions  # noqa: PLC0415

    return calibration_captions(config.num_select)


def _avg(bits: Mapping[str, int], sizes: Mapping[str, float]) -> float:
    if not bits:
        return float(FLOAT)
    w = np.array([sizes[n] for n in bits])
    return float((w * np.array(list(bits.values()))).sum() / w.sum())


def _cached_bits(run: Path, name: str, make) -> dict[str, int]:
    path = run / "configs" / f"{name}.yaml"
    if path.is_file():
        return read_bits(path)
    bits = make()
    write_bits(path, bits)
    return bits


def _cached_eval(run: Path, name: str, make) -> dict[str, Any]:
    path = run / "eval" / f"{name}.json"
    img_path = run / "eval" / f"{name}.npy"
    if path.is_file() and img_path.is_file():
        return {"metrics": json.loads(path.read_text()), "images": np.load(img_path)}
    out = make()
    img_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = img_path.with_suffix(".tmp.npy")
    np.save(tmp, out.images)
    os.replace(tmp, img_path)
    atomic_write_json(path, out.metrics)
    return {"metrics": out.metrics, "images": out.images}


def _pick_mixdq(
    cands, qpipe, qconfig, act_bits, prompts, config, pareto_data, name, sens, layers
) -> dict[str, int]:
    """Among the Pareto candidates, the one with the lowest image MSE vs float (official)."""
    size = _image_size(qpipe)
    ref = np.asarray(
        dataclasses.replace(
            qpipe,
            qconfig=qconfig(
                {n: FLOAT for n in layers.names}, {n: FLOAT for n in layers.names}, True
            ),
        )(prompts, height=size, width=size, seed=config.seed, num_inference_steps=config.steps)
    )
    scored = []
    for cand in cands:
        qp = dataclasses.replace(qpipe, qconfig=qconfig(cand.bits, act_bits, True))
        img = np.asarray(
            qp(prompts, height=size, width=size, seed=config.seed, num_inference_steps=config.steps)
        )
        scored.append((float(np.mean((img - ref) ** 2)), cand))
    pareto_data[name] = [
        {"avg_bits": c.avg_bits(layers.w_size), "mse": m, "target": c.target, "k": c.k}
        for m, c in scored
    ]
    # the paper's two comparison baselines at the same budget, scored the same way
    from mixdq_jax.allocation import naive_sorting, random_allocation  # noqa: PLC0415

    target = min(c.avg_bits(layers.w_size) for c in cands)
    for label, bits in (
        (
            "random",
            random_allocation(layers.w_size, candidates=(2, 4, 8), budget=target, seed=config.seed),
        ),
        (
            "naive_sorting",
            naive_sorting(
                {n: sens["weight", "sqnr"][n] for n in layers.names},
                layers.w_size,
                candidates=(2, 4, 8),
                budget=target,
            ),
        ),
    ):
        qp = dataclasses.replace(qpipe, qconfig=qconfig(bits, act_bits, True))
        img = np.asarray(
            qp(prompts, height=size, width=size, seed=config.seed, num_inference_steps=config.steps)
        )
        pareto_data.setdefault(f"{name}_baselines", []).append(
            {
                "method": label,
                "avg_bits": _avg(bits, layers.w_size),
                "mse": float(np.mean((img - ref) ** 2)),
            }
        )
    return dict(min(scored, key=lambda s: s[0])[1].bits)


def _unet_megabytes(pipe, w_bits: Mapping[str, int]) -> float:
    """Stored UNet size: quantized weights at their bits plus fp16 per-channel scale and zero
    point, every other parameter (biases, norms, float layers) in fp16."""
    import jax  # noqa: PLC0415

    from mixdq_jax.quant.quantize import unet_layers  # noqa: PLC0415

    total_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(pipe.params["unet"]))
    bits = 0.0
    quantized = 0
    for layer in unet_layers(pipe):
        b = w_bits.get(layer.name, FLOAT)
        out_ch = layer.weight_shape[-1]
        if b < FLOAT:
            bits += layer.weight_params * b + out_ch * 2 * 16
            quantized += layer.weight_params
    bits += (total_params - quantized) * 16
    return bits / 8 / 1e6


# ---------------------------------------------------------------------------------- report
def _fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}" if math.isfinite(x) else "-"
    return str(x)


def _write_report(
    report: Path, config, results, images, sens, layers, pareto_data, pipe, seconds: float
) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # noqa: PLC0415

    from mixdq_jax.testbed.evaluate import save_grid  # noqa: PLC0415

    report.mkdir(parents=True, exist_ok=True)
    fp = results["float"]
    fp_mb = _unet_megabytes(pipe, {})
    lines = [
        "# MixDQ study on the testbed",
        "",
        f"Model `{config.model}`, {config.steps} step(s), {config.num_calib} calibration "
        f"captions, {config.num_eval} held-out test captions (seed {config.seed}). "
        f"Run time {seconds / 60:.1f} min (this run; stages found on disk are not recomputed).",
        "",
        "| setting | method | W bits | A bits | content score | Frechet dist. | SSIM vs FP | "
        "PSNR vs FP | UNet MB |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| - | float | 16 | 16 | {_fmt(fp['content_score'])} | "
        f"{_fmt(fp['frechet_distance'], 2)} | 1 | - | {fp_mb:.2f} |",
    ]
    for setting in config.settings:
        for method in METHODS:
            m = results.get(f"{setting.name}_{method}", {})
            if "skipped" in m or not m:
                lines.append(f"| {setting.name} | {METHOD_TITLES[method]} | n/a | | | | | | |")
                continue
            lines.append(
                f"| {setting.name} | {METHOD_TITLES[method]} | {m['weight_avg_bits']:.2f} | "
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
    atomic_write_text(report / "report.md", "\n".join(lines))
    atomic_write_json(report / "metrics.json", results)

    # image grid: rows = methods, same captions and seeds
    from mixdq_jax.testbed import data  # noqa: PLC0415

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
    for name, pts in pareto_data.items():
        if name.endswith("_baselines"):
            for p in pts:
                ax.scatter(p["avg_bits"], p["mse"], marker="x", label=f"{name[:-10]} {p['method']}")
        else:
            ax.scatter(
                [p["avg_bits"] for p in pts],
                [p["mse"] for p in pts],
                s=12,
                label=f"{name} MixDQ candidates",
            )
    ax.set_xlabel("average weight bits")
    ax.set_ylabel("image MSE vs float")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(report / "pareto.png", dpi=110)
    plt.close(fig)


__all__ = ["DEFAULT_SETTINGS", "Setting", "StudyConfig", "run_study"]
