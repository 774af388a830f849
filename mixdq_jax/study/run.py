"""The whole MixDQ study on one model: the recipe for every (target, method), evaluated.

This is what ``make demo`` runs on the built-in testbed (``mixdq demo``). The allocation of
every row is the recipe of ``mixdq quantize`` (`mixdq_jax.recipe.Recipe`: calibration,
metric-decoupled sweeps, Algorithm 1, selection by image error on held-out captions); the
study adds the testbed's judge on held-out test captions and a report. Every stage writes its
results into the run directory (`mixdq_jax.rundir.RunDir`) as it goes and is skipped when
they are already there, so a killed study resumes where it stopped:

    RUN/calib/, RUN/sensitivity/    calibration and sweeps (shared by every row)
    RUN/quantize/<row>/             each row's candidates, chosen bits, settings
    RUN/configs/<row>.pareto.json   Fig. 8 data: the pick, its candidates, the baselines
    RUN/eval/<row>.json, .npy       testbed metrics and images of each evaluated row
    RUN/paper_eval/<row>/           with `StudyConfig.evaluation`: the paper's metrics
                                    (images/, metrics.json; `mixdq_jax.evaluation.run`)
    RUN/export/<row>/               the headline row (MixDQ, W4A8 where studied) exported:
                                    `mixdq inspect` / `mixdq generate --model` it
    RUN/report/                     report.md, grid.png, sensitivity.png, pareto.png
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.api import load_pipeline
from mixdq_jax.deploy.memory import stored_param_bytes
from mixdq_jax.pipeline import Pipeline
from mixdq_jax.recipe import ChosenBits, Recipe, RecipeConfig, Row, recipe_key, walk
from mixdq_jax.schedulers import default_scheduler
from mixdq_jax.study.baselines import allocation_baselines
from mixdq_jax.study.config import StudyConfig
from mixdq_jax.study.report import write_report
from mixdq_jax.testbed import calibration_captions
from mixdq_jax.testbed.evaluate import evaluate


def _stage(name: str) -> None:
    print(f"[mixdq demo] {name}", flush=True)


def study_recipe(config: StudyConfig, pipe: Pipeline) -> Recipe:
    """The recipe every row of the study shares (calibration and selection captions from the
    testbed's training split; the allocation benchmarks reuse it on the demo's run)."""
    captions = calibration_captions(config.num_calib + config.num_select)
    return Recipe(
        pipe,
        config.run_dir,
        RecipeConfig(
            calib_prompts=tuple(captions[: config.num_calib]),
            select_prompts=tuple(captions[config.num_calib :]),
            steps=config.steps,
            seed=config.seed,
            batch_size=16,
            chunk=config.chunk,
            reconstruction=config.reconstruction,
            preset=config.preset,
            knobs=config.knobs,
        ),  # fmt: skip
    )


def _headline(rows: dict[str, ChosenBits | str]) -> ChosenBits | None:
    """The row the study exports: MixDQ at W4A8 where it ran, else its first MixDQ row, else
    the first row with a packed format (FP8 is fake quantization only)."""
    done = [r for r in rows.values() if not isinstance(r, str) and r.method.format.exportable]
    mixdq = [r for r in done if r.method.name == "mixdq"]
    w4a8 = [r for r in mixdq if r.target.name == "W4A8"]
    return (w4a8 or mixdq or done or [None])[0]


def run_study(config: StudyConfig) -> Path:
    """Run (or resume) the study; returns the report folder."""
    start = time.perf_counter()
    pipe = load_pipeline(config.model, scheduler=default_scheduler(config.steps))
    recipe = study_recipe(config, pipe)
    run = recipe.run
    run.path.mkdir(parents=True, exist_ok=True)
    _stage("1/5 calibration")
    recipe.calibrate()
    sens = None
    if config.swept:
        _stage("2/5 sensitivity sweeps (weights and activations, every layer, 2/4/8 bits)")
        sens = recipe.sensitivities()
    else:
        _stage("2/5 sensitivity sweeps: not needed (every row quantizes every layer alike)")

    _stage("3/5 allocation (the stages of `mixdq quantize` for every row, up to reconstruct)")
    rows: dict[str, ChosenBits | str] = {}
    pareto: dict[str, Any] = {}
    for target in config.targets:
        for method in config.methods:
            key = recipe_key(target, method)
            why = method.supports(target)
            row = Row(target=target, method=method)
            rows[key] = why if why is not None else walk(recipe, row, stop_after="reconstruct")
            if method.name == "mixdq" and target.weight_bits < 8:
                pareto[target.name] = allocation_baselines(recipe, rows[key], config.seed)

    headline = _headline(rows)
    if headline is not None:
        folder = run.path / "export" / headline.key
        _stage(f"3/5 exporting {headline.key} to {folder} (`mixdq inspect {folder}`)")
        recipe.export(headline, folder)

    _stage("4/5 evaluation on held-out test captions")
    kw = dict(split="test", steps=config.steps, num=config.num_eval, seed=config.seed)
    results: dict[str, dict[str, Any]] = {
        "float": {"unet_mb": stored_param_bytes(pipe.unet.config, None) / 1e6, "compute_opt": 1.0}
    }
    images: dict[str, np.ndarray] = {}
    if config.judged:
        float_eval = run.cached_eval("float", lambda: evaluate(pipe, **kw))
        results["float"].update(float_eval["metrics"])
        images["float"] = float_eval["images"]
    if config.evaluation is not None:
        results["float"]["paper"] = recipe.evaluate(
            None, config.evaluation, out=run.path / "paper_eval" / "float"
        )
    for key, row in rows.items():
        if isinstance(row, str):
            results[key] = {"skipped": row}
            continue
        # the row's quantized UNet (after its refiners: learned params, PTQD's correction)
        row_pipe = recipe.bound(row)
        results[key] = recipe.summary(row)
        if config.judged:
            out = run.cached_eval(
                key, lambda p=row_pipe: evaluate(p, reference_images=float_eval["images"], **kw)
            )
            results[key].update(out["metrics"])
            images[key] = out["images"]
        if config.evaluation is not None:
            results[key]["paper"] = recipe.evaluate(
                row, config.evaluation, out=run.path / "paper_eval" / key
            )

    _stage("5/5 report")
    write_report(run.report_dir, config, results, images, sens, pareto, time.perf_counter() - start)
    return run.report_dir
