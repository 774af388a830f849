"""The whole MixDQ study on one model: calibrate, sweep, allocate, evaluate, report.

This is what ``make demo`` runs on the built-in testbed (``mixdq demo``). Every stage writes
its results into the run directory (`mixdq_jax.rundir.RunDir`) as it goes and is skipped when
they are already there, so a killed study resumes where it stopped:

    RUN/calib/                  calibration ranges and float references
    RUN/sensitivity/            per-layer sensitivities, official YAML format
    RUN/configs/<name>.yaml     the bit-width configurations (official format)
    RUN/eval/<row>.json, .npy   testbed metrics and images of each evaluated row
    RUN/report/                 report.md, grid.png, sensitivity.png, pareto.png

The rows are data (`config.METHODS` x `config.DEFAULT_SETTINGS`): the paper's Tables 1 and 3
rows float, naive PTQ, SQNR-only mixed precision, MixDQ without BOS-aware quantization, and
full MixDQ.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.allocation import average_bits
from mixdq_jax.api import load_pipeline
from mixdq_jax.calibrate import CalibConfig, calibrate
from mixdq_jax.deploy.memory import stored_param_bytes
from mixdq_jax.io_utils import atomic_write_json
from mixdq_jax.pipeline import Pipeline
from mixdq_jax.quant.qconfig import FLOAT_BITS, QConfig, QuantSpec
from mixdq_jax.quant.registry import layer_splits, unet_layers
from mixdq_jax.rundir import RunDir
from mixdq_jax.sensitivity import SweepConfig, sweep
from mixdq_jax.study import allocate
from mixdq_jax.study.config import Method, Setting, StudyConfig
from mixdq_jax.study.report import write_report
from mixdq_jax.testbed import calibration_captions
from mixdq_jax.testbed.evaluate import evaluate

Bits = dict[str, int]


def _stage(name: str) -> None:
    print(f"[mixdq demo] {name}", flush=True)


def _calibrate(pipe: Pipeline, config: StudyConfig, run: RunDir) -> None:
    height, width = pipe.image_size
    calib = CalibConfig(
        prompts=tuple(calibration_captions(config.num_calib)),
        num_inference_steps=config.steps,
        height=height,
        width=width,
        seed=config.seed,
        batch_size=16,
    )
    calibrate(pipe, calib, run)


class _Rows:
    """Configurations of the rows: ``QConfig``s from bit mappings, the selection images."""

    def __init__(self, pipe: Pipeline, config: StudyConfig, ranges: Mapping[str, Any]) -> None:
        self.pipe, self.config, self.ranges = pipe, config, ranges
        self.splits = layer_splits(unet_layers(pipe.unet.config))
        self.select_prompts = calibration_captions(config.num_select)

    def qconfig(self, w_bits: Mapping[str, int], a_bits: Mapping[str, int], bos: bool) -> QConfig:
        spec = QuantSpec(weight_bits=dict(w_bits), act_bits=dict(a_bits), bos_aware=bos)
        return spec.to_qconfig(self.splits, self.ranges)

    def selection_images(self, qconfig: QConfig) -> np.ndarray:
        size = self.pipe.image_size[0]
        return np.asarray(
            self.pipe(self.select_prompts, height=size, width=size, seed=self.config.seed,
                      num_inference_steps=self.config.steps, qconfig=qconfig)
        )  # fmt: skip


def _weight_bits(
    method: Method,
    setting: Setting,
    run: RunDir,
    rows: _Rows,
    sens: allocate.Sensitivities,
    layers: allocate.Layers,
    act: Bits,
) -> Bits | None:
    """A row's weight bits, computed once per (setting, allocation) and cached in the run."""
    target = setting.weight_bits
    if method.weights == "uniform":
        return allocate.uniform_weights(layers, target)
    name = f"{setting.name}_{method.weights}"
    if method.weights == "sqnr_only":
        return run.cached_bits(name, lambda: allocate.sqnr_only_weights(sens, layers, target))

    def mixdq() -> Bits:
        floats = dict.fromkeys(layers.names, FLOAT_BITS)
        reference = rows.selection_images(rows.qconfig(floats, floats, True))
        bits, pareto = allocate.pick_by_image_mse(
            allocate.mixdq_weight_candidates(sens, layers, target),
            lambda w: rows.selection_images(rows.qconfig(w, act, True)),
            reference,
            sens,
            layers,
            rows.config.seed,
        )
        atomic_write_json(run.pareto_path(name), pareto)
        return bits

    return run.cached_bits(name, mixdq)


def _row_metrics(
    pipe: Pipeline, w_bits: Bits, a_bits: Bits, setting: Setting, method: Method, layers
) -> dict[str, Any]:
    """What the report adds to a row's testbed metrics: bits and the stored UNet size."""
    spec = QuantSpec(weight_bits=w_bits, act_bits=a_bits, bos_aware=method.bos_aware)
    return {
        "weight_avg_bits": average_bits(w_bits, layers.w_size),
        "act_avg_bits": (
            average_bits({n: b for n, b in a_bits.items() if b < FLOAT_BITS},
                                  layers.a_size)
            if setting.act_bits < FLOAT_BITS
            else FLOAT_BITS
        ),  # fmt: skip
        "act_float_layers": sum(b >= FLOAT_BITS for b in a_bits.values()),
        "unet_mb": stored_param_bytes(pipe.unet.config, spec) / 1e6,
    }


def run_study(config: StudyConfig) -> Path:
    """Run (or resume) the study; returns the report folder."""
    start = time.perf_counter()
    run = RunDir(config.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(config.model, scheduler=None if config.steps == 1 else "LCMScheduler")
    _stage("1/5 calibration")
    _calibrate(pipe, config, run)
    _stage("2/5 sensitivity sweeps (weights and activations, every layer, 2/4/8 bits)")
    sens = sweep(pipe, run, SweepConfig(chunk=config.chunk))
    layers = allocate.Layers.of(unet_layers(pipe.unet.config))
    protected = allocate.protected_acts(sens, layers, config.protect_fraction)
    rows = _Rows(pipe, config, run.act_ranges())

    _stage("3/5 allocation")
    plan: dict[str, tuple[Setting, Method, Bits | None, Bits]] = {}
    for setting in config.settings:
        mixdq_act = allocate.act_bits("mixdq", setting.act_bits, layers, protected)
        for method in config.methods:
            a_bits = allocate.act_bits(method.acts, setting.act_bits, layers, protected)
            w_bits = _weight_bits(method, setting, run, rows, sens, layers, mixdq_act)
            plan[f"{setting.name}_{method.name}"] = (setting, method, w_bits, a_bits)

    _stage("4/5 evaluation on held-out test captions")
    kw = dict(split="test", steps=config.steps, num=config.num_eval, seed=config.seed)
    float_eval = run.cached_eval("float", lambda: evaluate(pipe, **kw))
    results: dict[str, dict[str, Any]] = {"float": float_eval["metrics"]}
    results["float"]["unet_mb"] = stored_param_bytes(pipe.unet.config, None) / 1e6
    images: dict[str, np.ndarray] = {"float": float_eval["images"]}
    for key, (setting, method, w_bits, a_bits) in plan.items():
        if w_bits is None:
            results[key] = {"skipped": "no uniform bit-width for this budget"}
            continue
        qc = rows.qconfig(w_bits, a_bits, method.bos_aware)
        out = run.cached_eval(
            key,
            lambda qc=qc: evaluate(pipe, reference_images=float_eval["images"], qconfig=qc, **kw),
        )
        results[key] = {
            **out["metrics"],
            **_row_metrics(pipe, w_bits, a_bits, setting, method, layers),
        }
        images[key] = out["images"]

    _stage("5/5 report")
    pareto = {}
    for setting in config.settings:
        path = run.pareto_path(f"{setting.name}_mixdq")
        if path.is_file():
            pareto[setting.name] = json.loads(path.read_text())
    write_report(
        run.report_dir, config, results, images, sens, pareto, time.perf_counter() - start
    )
    return run.report_dir
