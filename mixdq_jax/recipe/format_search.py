"""`mixdq quantize --budget`: each layer's format chosen under a measured cost budget.

The recipe's calibration, then the format sweep (`mixdq_jax.sensitivity.formats`: each layer
alone in each candidate format, MixDQ's metric-decoupled scores), MixDQ's activation
protection, and one exact one-hot program (`mixdq_jax.allocation.formats`) under budgets on
a per-layer cost table (`mixdq bench layers --out costs.json`): ``latency=F`` (a fraction of
the float UNet's latency), ``size=Nx`` / ``bops=Nx`` (N times fewer stored bytes / bit
operations than float over the table's layers). Written to ``RUN/quantize/<key>/``:
``formats.json`` (the choice, its predicted costs and the settings; a rerun with the same
settings reuses it) and ``report.json`` / ``report.md``.

Latency budgets and the additive model: when the table carries a fitted correction
(``mixdq bench layers --check-additivity``: whole-UNet latency ``~= a * sum + b``), ``F``
applies to the corrected prediction of the whole UNet, so the part no layer holds (attention
products, norms, launch overhead: ``b``) is not assumed to shrink; without one, to the sum.

Protection: the ``protect_top`` percent of each group's layers with the worst score at their
best activation-quantizing format keep float activations (formats ``float`` and weight-only
``w4a16``), as MixDQ keeps its most sensitive activations float. BOS handling is MixDQ's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.allocation.budget import is_content_layer
from mixdq_jax.allocation.formats import FormatChoice, FormatProgram, format_losses, parse_budget
from mixdq_jax.allocation.milp import InfeasibleBudget
from mixdq_jax.io_utils import atomic_write_json, atomic_write_text
from mixdq_jax.quant.layer_formats import (
    DEFAULT_SEARCH_FORMATS,
    LAYER_FORMATS,
    LayerFormat,
    parse_formats,
)
from mixdq_jax.quant.qconfig import QuantSpec
from mixdq_jax.recipe.run import Recipe, log
from mixdq_jax.sensitivity.formats import format_sweep

COST_KEYS = {"latency": "ms", "bytes": "bytes", "bops": "bops"}


@dataclass(frozen=True, kw_only=True)
class FormatSearch:
    """``budgets``: ``("latency=0.6",)`` etc. (several at once: all must hold); ``costs``:
    the cost table; ``formats``: the candidate formats (``float`` always among them)."""

    budgets: tuple[str, ...]
    costs: Path
    formats: tuple[str, ...] = DEFAULT_SEARCH_FORMATS

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", tuple(self.budgets))
        object.__setattr__(self, "formats", tuple(f.name for f in parse_formats(self.formats)))
        if not self.budgets:
            raise ValueError("a format search needs at least one --budget")
        resources = [parse_budget(b)[0] for b in self.budgets]
        dup = sorted({r for r in resources if resources.count(r) > 1})
        if dup:
            raise ValueError(f"--budget: {dup} budgeted twice")

    @property
    def key(self) -> str:
        """The run's folder name for this search: ``formats_latency0.6`` etc."""
        return "formats_" + "_".join(b.replace("=", "") for b in sorted(self.budgets))


@dataclass(frozen=True, kw_only=True)
class ChosenFormats:
    """A search's result: a format per layer, the spec that fake-quantizes a model with it,
    the program's answer and the limits it was solved under."""

    key: str
    formats: Mapping[str, str]
    spec: QuantSpec
    choice: FormatChoice
    protected: tuple[str, ...]
    latency_fit: Mapping[str, float] | None


def format_spec(
    formats: Mapping[str, str], *, symmetric_weights: bool, bos_aware: bool = True
) -> QuantSpec:
    """The `QuantSpec` of a format per layer (layers not named stay float)."""
    fmts = {n: LAYER_FORMATS[f] for n, f in formats.items()}
    return QuantSpec(
        weight_bits={n: f.w_bits for n, f in fmts.items()},
        act_bits={n: f.a_bits for n, f in fmts.items()},
        default_weight_bits=16, default_act_bits=16,
        fp8_layers=frozenset(n for n, f in fmts.items() if f.fp8),
        symmetric_weights=symmetric_weights, bos_aware=bos_aware,
    )  # fmt: skip


def table_costs(
    table: Mapping[str, Any], names: Sequence[str], formats: Sequence[str], where: str
) -> dict[str, dict[str, dict[str, float]]]:
    """``{resource: {layer: {format: cost}}}`` of the model's ``names`` from a cost table; a
    model layer the table lacks is an error naming it and the file."""
    missing = [n for n in names if n not in table["layers"]]
    if missing:
        raise ValueError(
            f"{where}: no costs for {len(missing)} layer(s) of this model, e.g. {missing[:5]}: "
            "was the table made for another model? (mixdq bench layers --model MODEL)"
        )
    out: dict[str, dict[str, dict[str, float]]] = {r: {} for r in COST_KEYS}
    for n in names:
        entry = table["layers"][n]["formats"]
        if "float" not in entry:
            raise ValueError(f"{where}: layer {n!r} has no float cost")
        for r, key in COST_KEYS.items():
            out[r][n] = {f: float(entry[f][key]) for f in formats if f in entry}
    return out


def protected_acts(scores: Mapping[str, Mapping[str, Mapping[str, float]]], fraction: float,
                   formats: Sequence[LayerFormat]) -> set[str]:  # fmt: skip
    """The ``fraction`` of each group's layers whose score at their best activation-quantizing
    format is the worst (content: SSIM, quality: SQNR)."""
    act = [f.name for f in formats if f.quantizes_acts]
    if not act or fraction <= 0:
        return set()
    out: set[str] = set()
    for metric, names in (
        ("ssim", list(scores["ssim"])),
        ("sqnr", [n for n in scores["sqnr"] if not is_content_layer(n)]),
    ):
        best = {n: max(scores[metric][n][f] for f in act) for n in names}
        count = math.ceil(fraction * len(best) - 1e-9)
        out |= set(sorted(best, key=lambda n: (best[n], n))[:count])
    return out


def search_formats(recipe: Recipe, search: FormatSearch) -> ChosenFormats:
    """Calibrate, sweep the formats, protect, solve (or reuse the run's ``formats.json``
    made with the same settings)."""
    from mixdq_jax.deploy.layer_costs import load_costs  # noqa: PLC0415

    table = load_costs(search.costs)
    formats = parse_formats(search.formats)
    names = list(recipe.layers.names)
    costs = table_costs(table, names, [f.name for f in formats], str(search.costs))
    knobs, preset = recipe.config.knobs, recipe.config.preset
    settings = {
        "budgets": sorted(search.budgets), "formats": list(search.formats),
        "costs": _table_identity(table), "protect_top": knobs.protect_top,
        "preset": preset.name,
    }  # fmt: skip
    path = recipe.run.recipe_dir(search.key) / "formats.json"
    _precheck(costs, search.budgets, table.get("fit"))  # before any work
    recipe.run.start_recipe(search.key, settings)
    recipe.calibrate()
    spec = QuantSpec(bos_aware=True, symmetric_weights=preset.symmetric_weights)
    log(f"format sweep over {', '.join(f.name for f in formats[1:])}")
    scores = format_sweep(recipe.pipe, recipe.run, formats, spec=spec,
                          chunk=recipe.config.chunk)  # fmt: skip
    protected = protected_acts(scores, knobs.protect_top / 100.0, formats)
    content = {n: scores["ssim"][n] for n in scores["ssim"]}
    quality = {n: s for n, s in scores["sqnr"].items() if n not in content}
    losses = format_losses(content, quality)
    allowed = {n: [f.name for f in formats if not f.quantizes_acts] for n in protected}
    program = FormatProgram(losses, {r: costs[r] for r in COST_KEYS}, allowed=allowed)
    fit = table.get("fit")
    parsed = [parse_budget(b) for b in search.budgets]
    limits = {r: _limit(program, r, v, form, fit) for r, v, form in parsed}
    choice = program.solve(limits)
    record = {"settings": settings, "formats": dict(choice.formats), "loss": choice.loss,
              "costs": dict(choice.costs), "limits": dict(choice.limits),
              "float_costs": {r: program.float_cost(r) for r in COST_KEYS},
              "protected": sorted(protected), "latency_fit": fit}  # fmt: skip
    atomic_write_json(path, record)
    counts = {f: sum(1 for v in choice.formats.values() if v == f) for f in search.formats}
    log(f"chosen formats ({search.key}): " + ", ".join(f"{f} {c}" for f, c in counts.items()))
    return ChosenFormats(
        key=search.key, formats=dict(choice.formats),
        spec=format_spec(choice.formats, symmetric_weights=preset.symmetric_weights),
        choice=choice, protected=tuple(sorted(protected)), latency_fit=fit,
    )  # fmt: skip


def _precheck(costs: Mapping[str, Mapping[str, Mapping[str, float]]], budgets: Sequence[str],
              fit: Mapping[str, float] | None) -> None:  # fmt: skip
    """Refuse a budget the cost table alone shows to be infeasible (no sweep needed)."""
    zero = {n: dict.fromkeys(c, 0.0) for n, c in costs["latency"].items()}
    program = FormatProgram(zero, costs)
    for resource, value, form in map(parse_budget, budgets):
        if resource != "latency" or not fit or form != "fraction":
            program.check(resource, _limit(program, resource, value, form, fit))
            continue
        low = predicted_latency(program.cheapest("latency"), fit)
        full = predicted_latency(program.float_cost("latency"), fit)
        if value * full < low * (1 - 1e-9):
            raise InfeasibleBudget(
                f"--budget latency={value:g} cannot be met on the table's device: the cheapest "
                f"format per layer predicts {low:.4g} ms for the whole UNet, {low / full:.3f} "
                f"of float's {full:.4g} ms (the table's fit: {float(fit['a']):.3f} x the "
                f"layers' sum + {float(fit['b_ms']):.4g} ms that no layer holds); the least "
                f"achievable budget is latency={math.ceil(low / full * 1000) / 1000:.3f}"
            )


def _table_identity(table: Mapping[str, Any]) -> dict[str, Any]:
    s = table["settings"]
    return {k: s.get(k) for k in ("model_hash", "batch", "latent", "device_kind", "platform")}


def _limit(program: FormatProgram, resource: str, value: float, form: str,
           fit: Mapping[str, float] | None) -> float:  # fmt: skip
    """The limit on the summed ``resource``; latency with a fit: the fraction of the
    corrected whole-UNet prediction (module docstring)."""
    base = program.float_cost(resource)
    if form == "times":
        return base / value
    if resource != "latency" or not fit:
        return base * value
    a, b = float(fit["a"]), float(fit["b_ms"])
    return (value * (a * base + b) - b) / a


def predicted_latency(summed_ms: float, fit: Mapping[str, float] | None) -> float:
    """The whole-UNet latency the table predicts from the layers' sum (with the fit)."""
    return summed_ms if not fit else float(fit["a"]) * summed_ms + float(fit["b_ms"])


def report_formats(
    recipe: Recipe, chosen: ChosenFormats, *, table: Mapping[str, Any],
    measure: bool = True, repeats: int = 5,
) -> dict[str, Any]:  # fmt: skip
    """``report.json`` / ``report.md`` of a search: the chosen format per layer, predicted
    vs measured UNet latency (the table's batch and latent, the deployed path; ``measure``)
    and stored size, and the selection images vs float (SSIM, MSE)."""
    from mixdq_jax.deploy.layer_costs import unet_latency_for  # noqa: PLC0415
    from mixdq_jax.metrics import ssim_global  # noqa: PLC0415

    qconfig = chosen.spec.to_qconfig(recipe.splits, recipe.run.act_ranges())
    images, ref = recipe.render(qconfig), recipe.reference()
    c = chosen.choice
    s = table["settings"]
    float_sum = sum(e["formats"]["float"]["ms"] for e in table["layers"].values())
    report: dict[str, Any] = {
        "key": chosen.key, "model": str(recipe.pipe.source),
        "formats": dict(chosen.formats), "protected": list(chosen.protected),
        "counts": {f: sum(1 for v in chosen.formats.values() if v == f)
                   for f in dict.fromkeys(chosen.formats.values())},
        "limits": dict(c.limits), "costs": dict(c.costs),
        "predicted_ms": predicted_latency(c.costs["latency"], chosen.latency_fit),
        "predicted_float_ms": predicted_latency(float_sum, chosen.latency_fit),
        "bytes": c.costs["bytes"], "float_bytes": sum(
            e["formats"]["float"]["bytes"] for e in table["layers"].values()),
        "selection_prompts": len(recipe.config.select_prompts),
        "mse_vs_fp": float(np.mean((images - ref) ** 2)),
        "ssim_vs_fp": float(np.mean(ssim_global(images * 255.0, ref * 255.0))),
        "timing": {"batch": s["batch"], "latent": s["latent"], "device": table.get("device")},
    }  # fmt: skip
    if measure:
        config = recipe.pipe.unet.config
        kw = dict(batch=s["batch"], latent=tuple(s["latent"]), seq_len=s["seq_len"],
                  repeats=repeats, float_dtype=s["float_dtype"], backend=s["kernel_backend"],
                  rank_fraction=s.get("rank_fraction"))  # fmt: skip
        report["measured_ms"] = unet_latency_for(config, chosen.formats, **kw)
        report["measured_float_ms"] = unet_latency_for(config, {}, **kw)
    json_path, md_path = recipe.run.recipe_report_paths(chosen.key)
    atomic_write_json(json_path, report)
    atomic_write_text(md_path, format_report_markdown(report))
    return report


def format_report_markdown(report: Mapping[str, Any]) -> str:
    """A few lines a person reads, and the per-layer table."""
    lat = [f"- UNet latency predicted {report['predicted_ms']:.2f} ms "
           f"({report['predicted_ms'] / report['predicted_float_ms']:.3f} of float's "
           f"{report['predicted_float_ms']:.2f} ms)"]  # fmt: skip
    if "measured_ms" in report:
        lat.append(
            f"- UNet latency measured {report['measured_ms']:.2f} ms "
            f"({report['measured_ms'] / report['measured_float_ms']:.3f} of float's "
            f"{report['measured_float_ms']:.2f} ms; batch {report['timing']['batch']}, latent "
            f"{report['timing']['latent']}, {report['timing']['device']})"
        )
    counts = ", ".join(f"{f} {n}" for f, n in report["counts"].items())
    lines = [
        f"# mixdq quantize: {report['key']}",
        "",
        f"- model: `{report['model']}`",
        "- budgets: " + ", ".join(f"{r} <= {v:.6g}" for r, v in report["limits"].items()),
        f"- layers per format: {counts}",
        *lat,
        f"- stored layer bytes {report['bytes'] / 1e6:.3f} MB vs float "
        f"{report['float_bytes'] / 1e6:.3f} MB ({report['float_bytes'] / report['bytes']:.2f}x)",
        f"- images vs float on {report['selection_prompts']} selection prompts: MSE "
        f"{report['mse_vs_fp']:.3g}, SSIM {report['ssim_vs_fp']:.4f}",
        *([f"- float activations kept (protected): {', '.join(report['protected'])}"]
          if report["protected"] else []),
        "",
        "| layer | format |",
        "| --- | --- |",
        *(f"| {n} | {f} |" for n, f in report["formats"].items()),
        "",
    ]  # fmt: skip
    return "\n".join(lines)


__all__ = [
    "ChosenFormats",
    "FormatSearch",
    "format_spec",
    "protected_acts",
    "report_formats",
    "search_formats",
    "table_costs",
]
