"""The format sweep: each layer alone in each candidate per-layer format, the rest float.

The per-layer formats (`mixdq_jax.quant.layer_formats`: float, fp8, w8a8, w4a8, w4a16) are
data as the bits are: a layer's format is its weight bits, activation bits and a per-layer
FP8 choice (`LayerQConfig.fp8`), so one stacked configuration per chunk runs under the
sweep's one compiled program per metric (`Evaluator`, kind ``"format"``). The metrics are
MixDQ's metric-decoupled ones: SQNR of the UNet output for every layer, global SSIM of the
images for the content layers. Chunks land in ``RUN/sensitivity-formats/format/`` (the
sweep's chunk files, the format's position in `FORMAT_CODES` in the ``bits`` column), so a
killed sweep resumes and a later sweep with more formats measures only the new ones; the
results in ``RUN/sensitivity-formats/format_<metric>.json``
(``{"formats": [...], "scores": {layer: {format: value}}}``).

``w4a4lr`` (groups, smoothing and a low-rank branch) has another layer structure and is not
swept here yet: it is a cost-table column only.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import replace

import jax
import numpy as np
from tqdm import tqdm

from mixdq_jax.io_utils import atomic_write_text
from mixdq_jax.pipeline import Pipeline
from mixdq_jax.quant.layer_formats import LAYER_FORMATS, LayerFormat
from mixdq_jax.quant.qconfig import QConfig, QuantSpec
from mixdq_jax.quant.registry import unet_layers
from mixdq_jax.rundir import RunDir
from mixdq_jax.sensitivity.calibration import load_calibration
from mixdq_jax.sensitivity.config import SweepConfig
from mixdq_jax.sensitivity.configs import FORMAT_KIND, base_qconfig
from mixdq_jax.sensitivity.evaluator import Evaluator

FORMAT_CODES: tuple[str, ...] = tuple(LAYER_FORMATS)  # a format's code in the chunk files
FORMAT_SWEEPS = "sensitivity-formats"
SWEPT = ("fp8", "w8a8", "w4a8", "w4a16")  # what the fake quantizer expresses as data today

FormatScores = dict[str, dict[str, float]]  # {layer: {format: value}}


def format_qconfigs(base: QConfig, tasks: Sequence[tuple[str, LayerFormat]]) -> QConfig:
    """The stacked single-layer configurations of ``tasks`` (layer, format) on the all-float
    ``base`` (which carries a per-layer FP8 leaf: `QuantSpec.fp8_layers`)."""
    n = len(tasks)
    stacked = jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], n, axis=0), base)
    for j, (name, fmt) in enumerate(tasks):
        lq = stacked.layers[name]
        lq.w_bits[j], lq.a_bits[j], lq.fp8[j] = fmt.w_bits, fmt.a_bits, fmt.fp8
    return stacked


def _check_formats(formats: Sequence[LayerFormat]) -> list[LayerFormat]:
    bad = [f.name for f in formats if not f.is_float and f.name not in SWEPT]
    if bad:
        raise ValueError(
            f"format sweep: {bad} cannot be swept yet (it runs another layer structure than "
            f"the per-channel grid); sweepable: {', '.join(SWEPT)}"
        )
    return [f for f in formats if not f.is_float]


def format_sweep(
    pipe: Pipeline,
    run_dir: str | os.PathLike | RunDir,
    formats: Sequence[LayerFormat],
    *,
    spec: QuantSpec | None = None,
    chunk: int = 8,
    sqnr: str = "mean_db",
    layers: Sequence[str] | None = None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
) -> dict[str, FormatScores]:
    """Run (or resume) the format sweep on the calibrated ``run_dir``; returns
    ``{metric: {layer: {format: value}}}`` (``float`` is not swept: it scores as the float
    model). ``spec``: BOS handling, shortcut split and weight symmetry of the int formats.
    ``layers``: only these (``None``: every quantizable layer)."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    swept = _check_formats(formats)
    spec = replace(spec or QuantSpec(), fp8=False, fp8_layers=frozenset())
    calib = load_calibration(run, pipe) if evaluator is None else evaluator.calib
    if evaluator is None:
        evaluator = Evaluator(pipe, calib)
    base = base_qconfig(pipe, spec, calib.ranges)
    chunk = math.ceil(chunk / evaluator.size) * evaluator.size
    sweeps = run.with_sensitivity(FORMAT_SWEEPS)
    meta = {
        "calibration": calib.meta,
        "weight_format": base.weight_format,
        "bos_aware": spec.bos_aware,
        "shortcut_split": spec.shortcut_split,
        "sqnr": sqnr,
    }
    sweeps.start_sweep(FORMAT_KIND, meta)
    registry = list(unet_layers(pipe.unet.config))
    if layers is not None:
        unknown = sorted(set(layers) - {info.name for info in registry})
        if unknown:
            raise ValueError(f"format sweep: unknown layer(s) {unknown[:20]}")
        registry = [info for info in registry if info.name in set(layers)]
    out: dict[str, FormatScores] = {}
    for metric, names in SweepConfig().metric_layers(registry).items():
        done = _sweep_metric(evaluator, base, sweeps, metric, names, swept, chunk, sqnr, progress)
        out[metric] = {n: {f.name: done[n, FORMAT_CODES.index(f.name)] for f in swept}
                       for n in names}  # fmt: skip
        _write(sweeps, metric, out[metric], [f.name for f in swept])
    return out


def _sweep_metric(
    evaluator: Evaluator, base: QConfig, run: RunDir, metric: str, names: Sequence[str],
    formats: Sequence[LayerFormat], chunk: int, sqnr: str, progress: bool,
) -> dict[tuple[str, int], float]:  # fmt: skip
    tasks = [(n, f) for n in names for f in formats]
    done = run.read_chunks(FORMAT_KIND, metric)
    todo = [(n, f) for n, f in tasks if (n, FORMAT_CODES.index(f.name)) not in done]
    number = run.next_chunk_number(FORMAT_KIND, metric)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=f"format sweep {metric}",
               unit="cfg", disable=not progress, file=sys.stderr)  # fmt: skip
    with bar:
        for i, start in enumerate(range(0, len(todo), chunk)):
            part = todo[start : start + chunk]
            padded = part + [part[-1]] * (chunk - len(part))  # fixed shape: one compile
            values = evaluator.evaluate(
                metric, FORMAT_KIND, format_qconfigs(base, padded), sqnr=sqnr
            )[: len(part)]
            keyed = [(n, FORMAT_CODES.index(f.name)) for n, f in part]
            run.write_chunk(FORMAT_KIND, metric, number + i, keyed, values)
            done.update(zip(keyed, (float(v) for v in values), strict=True))
            bar.update(len(part))
    bad = sorted({n for n, f in tasks if not math.isfinite(done[n, FORMAT_CODES.index(f.name)])})
    if bad:
        raise ValueError(f"format sweep {metric}: non-finite scores for layer(s) {bad[:20]}")
    return done


def _write(run: RunDir, metric: str, scores: FormatScores, formats: list[str]) -> None:
    payload = {"formats": formats, "scores": dict(sorted(scores.items()))}
    path = run.scores_path(FORMAT_KIND, metric, official=False)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


__all__ = ["FORMAT_CODES", "FORMAT_SWEEPS", "format_qconfigs", "format_sweep"]
