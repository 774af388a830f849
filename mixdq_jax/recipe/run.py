"""The whole MixDQ recipe on one model: what `mixdq quantize` runs, stage by stage.

Stages (`config.STAGES`), each written into the run directory as it goes and skipped when
its results are there, so a killed run resumes where it stopped and ``stop_after`` lets a user
run stages on different machines (the sweep on a cluster, the rest on a laptop):

1. ``calibrate``: activation ranges and float references on the calibration prompts;
2. ``sensitivity``: the metric-decoupled per-layer sweeps (SQNR for every layer, SSIM for the
   content layers; weights and activations at 2/4/8 bits). Without BOS-aware quantization the
   BOS layers' scores change, so that method sweeps them again with BOS handling off;
3. ``weights``: the method's weight candidates (`allocate`), activations float, the one with
   the lowest image MSE vs float on the held-out selection prompts;
4. ``acts``: the protected layers and the activation candidates given the chosen weights,
   picked the same way (the official pipeline's order: weights first);
   ``reconstruct`` (methods with learned rounding or PTQD only, `recipe.reconstruct`): the
   chosen bits reconstructed block by block; later stages run the learned UNet params;
5. ``export``: the chosen configuration as a quantized pipeline folder (`mixdq export`);
6. ``report``: chosen and effective bits, stored size, images vs float.

The testbed study (`mixdq_jax.study`) calls the same :class:`Recipe` for every row.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from mixdq_jax.allocation import average_bits
from mixdq_jax.calibrate import CalibConfig, calibrate
from mixdq_jax.evaluation.bops import compute_cost
from mixdq_jax.io_utils import atomic_write_json, atomic_write_text
from mixdq_jax.pipeline import Pipeline
from mixdq_jax.quant.qconfig import FLOAT_BITS, QConfig, QuantSpec, is_bos_layer
from mixdq_jax.quant.registry import layer_splits, unet_layers
from mixdq_jax.recipe.allocate import (
    AllocationKnobs,
    Bits,
    Layers,
    Sensitivities,
    act_candidates,
    bits_summary,
    fingerprint,
    protected_acts,
    weight_candidates,
)
from mixdq_jax.recipe.config import PRESETS, STAGES, Method, Preset, Target
from mixdq_jax.recipe.reconstruct import needs_reconstruction, reconstruct_stage
from mixdq_jax.reconstruction import ReconConfig
from mixdq_jax.rundir import RunDir
from mixdq_jax.sensitivity import SweepConfig, sweep
from mixdq_jax.sensitivity.calibration import load_calibration
from mixdq_jax.sensitivity.evaluator import Evaluator

if TYPE_CHECKING:
    from mixdq_jax.evaluation.run import ReportEval

NO_BOS_SWEEPS = "sensitivity-nobos"


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """Settings shared by every target and method of one run.

    ``calib_prompts`` drive calibration and the sweeps; ``select_prompts`` (held out from
    calibration) pick among candidates by image MSE vs float. ``height``/``width``: ``None``
    is the model's native size. ``reconstruction``: the settings of the ``reconstruct``
    stage (methods with learned rounding).
    """

    calib_prompts: tuple[str, ...]
    select_prompts: tuple[str, ...]
    preset: Preset = PRESETS["ours"]
    knobs: AllocationKnobs = field(default_factory=AllocationKnobs)
    steps: int = 1
    guidance_scale: float = 0.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    batch_size: int = 8
    chunk: int = 8
    reconstruction: ReconConfig = field(default_factory=ReconConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "calib_prompts", tuple(self.calib_prompts))
        object.__setattr__(self, "select_prompts", tuple(self.select_prompts))
        if not self.calib_prompts or not self.select_prompts:
            raise ValueError("the recipe needs calibration prompts and selection prompts")
        if self.steps < 1 or self.batch_size < 1 or self.chunk < 1:
            raise ValueError("steps, batch_size and chunk must be >= 1")


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """One (target, method)'s chosen bits and the spec that quantizes a model with them."""

    target: Target
    method: Method
    weight_bits: Bits
    act_bits: Bits
    spec: QuantSpec

    @property
    def key(self) -> str:
        return recipe_key(self.target, self.method)


def recipe_key(target: Target, method: Method) -> str:
    return f"{target.name}_{method.name}"


def check_request(target: Target, method: Method, out: str | Path | None = None) -> None:
    """Refuse a (target, method, out) the recipe cannot do, before any work."""
    why = method.supports(target)
    if why is not None:
        raise ValueError(f"method {method.name} at {target.name}: {why}")
    if method.fp8 and out is not None:
        raise ValueError("FP8 is a fake-quant baseline: it has no packed export (drop --out)")


def _log(message: str) -> None:
    print(f"[mixdq quantize] {message}", file=sys.stderr, flush=True)


class Recipe:
    """One model and one run directory: the stages `mixdq quantize` and the study share."""

    def __init__(self, pipe: Pipeline, run: RunDir | str | Path, config: RecipeConfig) -> None:
        self.pipe, self.config = pipe, config
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        registry = unet_layers(pipe.unet.config)
        self.layers = Layers.of(registry)
        self.splits = layer_splits(registry)
        native_h, native_w = pipe.image_size
        self.height = config.height or native_h
        self.width = config.width or native_w
        self._sens: dict[bool, Sensitivities] = {}
        self._evaluator: Evaluator | None = None
        self._reference: np.ndarray | None = None
        self._ranges: dict[str, np.ndarray] | None = None
        self._learned: dict[str, tuple[Pipeline, dict[str, np.ndarray], Any]] = {}

    # ---------------------------------------------------------------- calibrate, sensitivity
    def calibrate(self) -> None:
        c, p = self.config, self.config.preset
        calibrate(
            self.pipe,
            CalibConfig(
                prompts=c.calib_prompts, num_inference_steps=c.steps,
                guidance_scale=c.guidance_scale, height=self.height, width=self.width,
                seed=c.seed, batch_size=c.batch_size, method=p.range_method,
                momentum=p.momentum, observe_weight_bits=p.observe_weight_bits,
                symmetric_weights=p.symmetric_weights,
            ),
            self.run,
        )  # fmt: skip

    def _sweep(self, run: RunDir, *, bos_aware: bool, layers: Sequence[str] | None) -> Any:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.pipe, load_calibration(self.run, self.pipe))
        symmetric = self.config.preset.symmetric_weights
        spec = QuantSpec(symmetric_weights=symmetric, bos_aware=bos_aware)
        sweep_config = SweepConfig(chunk=self.config.chunk, spec=spec, layers=layers)
        return sweep(self.pipe, run, sweep_config, evaluator=self._evaluator)

    def sensitivities(self, *, bos_aware: bool = True) -> Sensitivities:
        """The metric-decoupled sweeps (run or resumed). ``bos_aware=False``: the BOS
        layers' scores measured with BOS handling off (every other layer's single-layer score
        does not depend on it)."""
        if bos_aware not in self._sens:
            sens = dict(self._sweep(self.run, bos_aware=True, layers=None))
            if not bos_aware:
                bos = [n for n in self.layers.names if is_bos_layer(n)]
                if bos:
                    run = self.run.with_sensitivity(NO_BOS_SWEEPS)
                    for key, scores in self._sweep(run, bos_aware=False, layers=bos).items():
                        sens[key] = {**sens[key], **scores}
            self._sens[bos_aware] = sens
        return self._sens[bos_aware]

    def _sensitivities_for(self, method: Method, allocation: str) -> Sensitivities:
        """The sweeps an allocation needs: none for uniform bits."""
        return {} if allocation == "uniform" else self.sensitivities(bos_aware=method.bos_aware)

    # ---------------------------------------------------------------- configurations, images
    def spec(self, method: Method, w_bits: Mapping[str, int], a_bits: Mapping[str, int]):
        return QuantSpec(
            weight_bits=dict(w_bits),
            act_bits=dict(a_bits),
            bos_aware=method.bos_aware,
            symmetric_weights=self.config.preset.symmetric_weights and not method.fp8,
            fp8=method.fp8,
        )

    def qconfig(self, method: Method, w_bits: Mapping[str, int], a_bits: Mapping[str, int]):
        if self._ranges is None:  # read once: the selection builds hundreds of configs
            self._ranges = self.run.act_ranges()
        return self.spec(method, w_bits, a_bits).to_qconfig(self.splits, self._ranges)

    def render(self, qconfig: QConfig | None, pipe: Pipeline | None = None) -> np.ndarray:
        """The selection prompts' images (``[N, H, W, 3]`` in [0, 1]); batch ``b`` uses seed
        ``seed + b``. A configuration whose images hold NaN/inf is an error naming the stage
        (it would otherwise score NaN and win or lose the selection at random). ``pipe``:
        another pipeline to render with (the learned UNet params of `learned`)."""
        c = self.config
        pipe = self.pipe if pipe is None else pipe
        prompts = list(c.select_prompts)
        out = []
        for b, start in enumerate(range(0, len(prompts), c.batch_size)):
            out.append(
                np.asarray(
                    pipe(
                        prompts[start : start + c.batch_size],
                        num_inference_steps=c.steps,
                        guidance_scale=c.guidance_scale,
                        height=self.height,
                        width=self.width,
                        seed=c.seed + b,
                        qconfig=qconfig,
                        check=True,
                    ),  # fmt: skip
                    np.float32,
                )
            )
        return np.concatenate(out)

    def reference(self) -> np.ndarray:
        """The float model's selection images (cached in the run)."""
        if self._reference is None:
            self._reference = self.run.selection_reference(
                self.config.select_prompts, lambda: self.render(None)
            )
        return self._reference

    def image_mse(self, qconfig: QConfig) -> float:
        return float(np.mean((self.render(qconfig) - self.reference()) ** 2))

    # ---------------------------------------------------------------- allocation stages
    def _settings(self, target: Target, method: Method) -> dict[str, Any]:
        c = self.config
        return {
            "target": target.name, "method": method.settings(), "preset": asdict(c.preset),
            "knobs": asdict(c.knobs), "select_prompts": list(c.select_prompts), "seed": c.seed,
            "steps": c.steps, "guidance_scale": c.guidance_scale,
            "height": self.height, "width": self.width,
        }  # fmt: skip

    def _pick(
        self,
        key: str,
        kind: str,
        candidates: Sequence[Bits],
        qconfig_of: Callable[[Bits], QConfig],
        sizes: Mapping[str, float],
    ) -> Bits:
        """The candidate with the lowest image MSE vs float; scores are written as they go."""
        if len(candidates) == 1:
            return dict(candidates[0])
        state = self.run.candidate_scores(key, kind)
        scores: dict[str, float] = dict(state.get("scores", {}))
        fingerprints = [fingerprint(c) for c in candidates]
        todo = [i for i, f in enumerate(fingerprints) if f not in scores]
        listing = [
            {
                "fingerprint": f,
                "avg_bits": average_bits({n: b for n, b in c.items() if b < FLOAT_BITS}, sizes),
            }
            for f, c in zip(fingerprints, candidates, strict=True)
        ]
        bar = tqdm(
            total=len(candidates), initial=len(candidates) - len(todo),
            desc=f"{key} {kind} candidates", unit="cfg", file=sys.stderr,
        )  # fmt: skip
        with bar:
            for i in todo:
                scores[fingerprints[i]] = self.image_mse(qconfig_of(candidates[i]))
                self.run.write_candidate_scores(
                    key, kind, {"candidates": listing, "scores": scores}
                )
                bar.update(1)
        best = min(range(len(candidates)), key=lambda i: (scores[fingerprints[i]], i))
        return dict(candidates[best])

    def weights(self, target: Target, method: Method) -> Bits:
        """Stage ``weights``: the chosen weight bits (activations float while choosing)."""
        key = recipe_key(target, method)
        chosen = self.run.chosen_bits(key, "weight")
        if chosen is None:
            sens = self._sensitivities_for(method, method.weights)
            cands = weight_candidates(sens, self.layers, method, target, self.config.knobs)
            floats = dict.fromkeys(self.layers.names, FLOAT_BITS)
            chosen = self._pick(
                key, "weight", cands, lambda w: self.qconfig(method, w, floats), self.layers.w_size
            )
            self.run.write_chosen_bits(key, "weight", chosen)
        return chosen

    def acts(self, target: Target, method: Method, w_bits: Mapping[str, int]) -> Bits:
        """Stage ``acts``: the chosen activation bits given the chosen weights."""
        key = recipe_key(target, method)
        chosen = self.run.chosen_bits(key, "act")
        if chosen is None:
            sens, protected = {}, set()  # A16: every activation float, nothing to choose
            if target.quantizes_acts:
                sens = self._sensitivities_for(method, method.acts)
                protected = protected_acts(sens, self.layers, method, self.config.knobs)
            cands = act_candidates(sens, self.layers, method, target, self.config.knobs, protected)
            chosen = self._pick(
                key, "act", cands, lambda a: self.qconfig(method, w_bits, a), self.layers.a_size
            )
            self.run.write_chosen_bits(key, "act", chosen)
        return chosen

    def allocation(
        self, target: Target, method: Method, *, stop_after: str | None = None
    ) -> Allocation | None:
        """Stages ``weights`` and ``acts`` of one (target, method), run or resumed
        (``None`` when ``stop_after`` is ``"weights"``)."""
        check_request(target, method)
        self.run.start_recipe(recipe_key(target, method), self._settings(target, method))
        w_bits = self.weights(target, method)
        if stop_after == "weights":
            return None
        a_bits = self.acts(target, method, w_bits)
        return Allocation(
            target=target, method=method, weight_bits=w_bits, act_bits=a_bits,
            spec=self.spec(method, w_bits, a_bits),
        )  # fmt: skip

    # ---------------------------------------------------------------- reconstruct
    def learned(self, allocation: Allocation) -> tuple[Pipeline, dict[str, np.ndarray], Any]:
        """Stage ``reconstruct``: ``(pipeline, activation ranges, PTQD noise model or None)``
        the allocation runs with: the float pipeline and the calibrated ranges, or for a
        method with learned rounding / PTQD its reconstructed UNet (run or resumed)."""
        if not needs_reconstruction(allocation.method):
            return self.pipe, self.run.act_ranges(), None
        if allocation.key not in self._learned:
            w, a = allocation.weight_bits, allocation.act_bits
            self._learned[allocation.key] = reconstruct_stage(
                self.pipe, self.run, allocation.key, self.qconfig(allocation.method, w, a),
                allocation.method, self.config.reconstruction,
            )  # fmt: skip
        return self._learned[allocation.key]

    def quantized(self, allocation: Allocation) -> tuple[Pipeline, QConfig]:
        """``(pipeline, qconfig)`` that render ``allocation`` as it is exported: for a method
        with learned rounding the reconstructed UNet, its learned activation ranges and
        (PTQD at several steps) its noise model."""
        pipe, ranges, _ = self.learned(allocation)
        spec = self.spec(allocation.method, allocation.weight_bits, allocation.act_bits)
        return pipe, spec.to_qconfig(self.splits, ranges)

    # ---------------------------------------------------------------- export, report
    def export(
        self, allocation: Allocation, out: str | Path, *, overwrite: bool = False
    ) -> dict[str, Any]:
        """Stage ``export``: the quantized folder (skipped when ``out`` already holds it;
        ``overwrite``: as `mixdq export --overwrite`)."""
        from mixdq_jax.deploy.checkpoint import (  # noqa: PLC0415
            export_quantized_pipeline,
            read_quant_meta,
        )

        check_request(allocation.target, allocation.method, out)
        out = Path(out)
        recorded = self.run.export_record(allocation.key)
        if recorded is not None and (out / "unet").is_dir():
            try:
                meta = read_quant_meta(out / "unet")
            except (OSError, ValueError):
                meta = None
            if meta is not None and recorded.get("meta") == _jsonable(meta):
                return meta
        pipe, ranges, _ = self.learned(allocation)
        meta = export_quantized_pipeline(
            pipe, allocation.spec, out, calib=ranges, overwrite=overwrite
        )
        self.run.write_export_record(allocation.key, {"out": str(out), "meta": _jsonable(meta)})
        return meta

    def report(
        self,
        allocation: Allocation,
        out: str | Path | None = None,
        evaluation: ReportEval | None = None,
    ) -> dict[str, Any]:
        """Stage ``report``: bits (effective ones count float layers at 16), the stored
        UNet size, and the selection images vs float; with ``evaluation`` also the paper's
        metrics (`evaluate`); ``report.json`` and ``report.md``."""
        from mixdq_jax.deploy.memory import stored_param_bytes  # noqa: PLC0415
        from mixdq_jax.metrics import psnr, ssim_global  # noqa: PLC0415

        method = allocation.method
        pipe, qconfig = self.quantized(allocation)
        noise = self.learned(allocation)[2]
        images, ref = self.render(qconfig, pipe) * 255.0, self.reference() * 255.0
        unet_config = self.pipe.unet.config
        float_mb = stored_param_bytes(unet_config, None) / 1e6
        # FP8 is fake quantization only: there is no packed export to measure
        unet_mb = None if method.fp8 else stored_param_bytes(unet_config, allocation.spec) / 1e6
        report = {
            "target": allocation.target.name,
            "method": method.name,
            "preset": self.config.preset.name,
            "model": str(self.pipe.source),
            **bits_summary(allocation.weight_bits, allocation.act_bits, self.layers),
            "unet_mb": unet_mb,
            "float_unet_mb": float_mb,
            "storage_opt": None if unet_mb is None else float_mb / unet_mb,
            # the paper's Compute Opt.: bit operations of one UNet forward vs FP16
            "compute_opt": compute_cost(
                unet_config, allocation.weight_bits, allocation.act_bits
            )["compute_opt"],
            "selection_prompts": len(self.config.select_prompts),
            "mse_vs_fp": float(np.mean((images / 255.0 - ref / 255.0) ** 2)),
            "psnr_vs_fp": float(np.mean(psnr(images, ref, axis=(-3, -2, -1)))),
            "ssim_vs_fp": float(np.mean(ssim_global(images, ref))),
            "out": None if out is None else str(out),
        }
        if needs_reconstruction(method):
            report["rounding"] = method.rounding
            report["ptqd_k"] = None if noise is None else noise.k.tolist()
            if noise is not None:  # the residual and, in the loop, the fresh noise kept
                plan = self.pipe.scheduler.set_timesteps(self.config.steps)
                kept = noise.for_plan(self.pipe.scheduler, plan).noise_scale
                report["ptqd_std"] = noise.std.tolist()
                report["ptqd_noise_scale"] = np.asarray(kept, np.float64).tolist()
        if evaluation is not None:
            report["evaluation"] = self.evaluate(allocation, evaluation, pipe=pipe,
                                                 qconfig=qconfig)  # fmt: skip
        json_path, md_path = self.run.recipe_report_paths(allocation.key)
        atomic_write_json(json_path, report)
        atomic_write_text(md_path, report_markdown(report))
        return report


    def evaluate(
        self,
        allocation: Allocation | None,
        evaluation: ReportEval,
        *,
        pipe: Pipeline | None = None,
        qconfig: QConfig | None = None,
        out: Path | None = None,
    ) -> dict[str, Any]:
        """The paper's metrics of one configuration (`mixdq_jax.evaluation.run`): images and
        ``metrics.json`` in ``out`` (default ``RUN/quantize/<key>/evaluation/``), resumable;
        the float model's images, for the "vs float" metrics, from the shared cache.
        ``allocation=None``: the float model itself. Returns `report_values`."""
        from mixdq_jax.evaluation.bops import efficiency  # noqa: PLC0415
        from mixdq_jax.evaluation.images import GenerationSettings, model_fingerprint  # noqa: PLC0415
        from mixdq_jax.evaluation.run import (  # noqa: PLC0415
            EvalRequest,
            Subject,
            evaluate_model,
            report_values,
        )

        c = self.config
        run_id = {"dtype": str(np.dtype(self.pipe.unet.dtype)),
                  "scheduler": type(self.pipe.scheduler).__name__}  # fmt: skip
        identity = {**model_fingerprint(self.pipe.source), **run_id, **(evaluation.identity or {})}
        latent = (self.height // self.pipe.vae_scale_factor,
                  self.width // self.pipe.vae_scale_factor)  # fmt: skip
        cost = efficiency(self.pipe.unet.config, latent=latent,
                          spec=None if allocation is None else allocation.spec)  # fmt: skip
        if allocation is None:
            quantization, load_float = "float", None
            out = out or self.run.path / "quantize" / "float_evaluation"
        else:
            quantization = {
                "recipe": allocation.key,
                "bits": fingerprint({"w": allocation.weight_bits, "a": allocation.act_bits,
                                     "method": allocation.method.settings(),
                                     "preset": asdict(c.preset)}),
            }  # fmt: skip
            load_float = self._float_pipe
            out = out or self.run.recipe_dir(allocation.key) / "evaluation"
        generation = GenerationSettings(
            steps=c.steps, seed=c.seed, height=self.height, width=self.width,
            guidance_scale=c.guidance_scale, batch=evaluation.batch,
        )  # fmt: skip
        subject = Subject(
            pipe=self.pipe if pipe is None else pipe, identity=identity,
            quantization=quantization, qconfig=qconfig, float_identity=identity,
            load_float=load_float,
        )  # fmt: skip
        _log(f"evaluation of {quantization if allocation is None else allocation.key} on "
             f"{len(evaluation.prompts.prompts)} prompts -> {out}")  # fmt: skip
        result = evaluate_model(
            subject, evaluation.prompts, out,
            request=EvalRequest(metrics=evaluation.metrics, weights=evaluation.weights,
                                generation=generation, metric_batch=evaluation.batch),
            efficiency=cost, cache=evaluation.cache,
        )  # fmt: skip
        return {**report_values(result), "out": str(out)}

    def _float_pipe(self) -> Pipeline:
        return self.pipe


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _size_line(report: Mapping[str, Any]) -> str:
    if report["unet_mb"] is None:
        return "- UNet as stored: no packed export (FP8 is fake quantization only)"
    ratio = report["float_unet_mb"] / report["unet_mb"]
    return (
        f"- UNet as stored: {report['unet_mb']:.2f} MB (float16: "
        f"{report['float_unet_mb']:.2f} MB, {ratio:.2f}x smaller)"
    )


def _evaluation_lines(values: Mapping[str, Any] | None) -> list[str]:
    if not values:
        return []
    from mixdq_jax.evaluation.run import REPORT_COLUMNS  # noqa: PLC0415

    shown = [f"{label} {values[k]:.{d}f}" for k, label, d in REPORT_COLUMNS if k in values]
    return [f"- the paper's metrics on {values['prompts']} evaluation prompts: "
            f"{', '.join(shown)} (`{values['out']}/metrics.json`)"]  # fmt: skip


def _ptqd_lines(report: Mapping[str, Any]) -> list[str]:
    if report.get("ptqd_k") is None:
        return []

    def steps(key: str) -> str:
        return ", ".join(f"{v:.4g}" for v in report[key])

    return [
        f"- PTQD per sampling step: slope k {steps('ptqd_k')}, residual std "
        f"{steps('ptqd_std')}, fresh noise kept x {steps('ptqd_noise_scale')}"
    ]


def report_markdown(report: Mapping[str, Any]) -> str:
    """A few lines a person reads: what was chosen and what it costs."""
    floats = report["act_float_layers"]
    return "\n".join(
        [
            f"# mixdq quantize: {report['target']} {report['method']} ({report['preset']} preset)",
            "",
            f"- model: `{report['model']}`",
            f"- weights: {report['weight_avg_bits']:.3f} average bits",
            f"- activations: {report['act_quantized_bits']:.3f} average bits over the quantized "
            f"layers, {report['act_effective_bits']:.3f} effective (the {len(floats)} float "
            "layers counted at 16 bits)",
            _size_line(report),
            f"- compute: {report['compute_opt']:.2f}x fewer bit operations than FP16 (the "
            "paper's Compute Opt.; layers with float activations count 16 x 16 bits)",
            f"- images vs float on {report['selection_prompts']} held-out selection prompts: "
            f"MSE {report['mse_vs_fp']:.3g}, PSNR {report['psnr_vs_fp']:.2f} dB, "
            f"SSIM {report['ssim_vs_fp']:.4f}",
            *_evaluation_lines(report.get("evaluation")),
            *_ptqd_lines(report),
            *([f"- float activation layers: {', '.join(floats)}"] if floats else []),
            *([f"- quantized folder: `{report['out']}`"] if report["out"] else []),
            "",
        ]
    )


def quantize(
    pipe: Pipeline,
    run: RunDir | str | Path,
    config: RecipeConfig,
    *,
    target: Target,
    method: Method,
    out: str | Path | None = None,
    stop_after: str = "report",
    overwrite: bool = False,
    evaluation: ReportEval | None = None,
) -> dict[str, Any] | None:
    """Run (or resume) the recipe for one (target, method) up to ``stop_after``; returns the
    report, or ``None`` when stopped earlier. ``evaluation``: the paper's metrics in the
    report (`Recipe.evaluate`). Without ``out`` the export stage is skipped;
    ``out`` is checked before any work (`mixdq_jax.deploy.check_export_folder`: new, empty or
    an earlier export, unless ``overwrite``)."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after {stop_after!r}: choose one of {', '.join(STAGES)}")
    check_request(target, method, out)
    if out is not None:
        from mixdq_jax.deploy.checkpoint import check_export_folder  # noqa: PLC0415

        check_export_folder(pipe.source, out, overwrite=overwrite)
    recipe = Recipe(pipe, run, config)
    _log("stage calibrate")
    recipe.calibrate()
    if stop_after == "calibrate":
        return None
    if (method.weights, method.acts) == ("uniform", "uniform"):
        _log("stage sensitivity: not needed (uniform bits)")
    else:
        _log("stage sensitivity")
        recipe.sensitivities(bos_aware=method.bos_aware)
    if stop_after == "sensitivity":
        return None
    _log("stage weights, then acts")
    allocation = recipe.allocation(target, method, stop_after=stop_after)
    if allocation is None or stop_after == "acts":
        return None
    if needs_reconstruction(method):
        _log("stage reconstruct")
        recipe.learned(allocation)
    if stop_after == "reconstruct":
        return None
    if out is not None:
        _log(f"stage export -> {out}")
        recipe.export(allocation, out, overwrite=overwrite)
    if stop_after == "export":
        return None
    _log("stage report")
    return recipe.report(allocation, out, evaluation)
