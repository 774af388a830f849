"""The whole MixDQ recipe on one model: what `mixdq quantize` runs, stage by stage.

The stages (`recipe.stages.STAGES`, one table that `quantize` and the study walk) each write
into the run directory as they go and are skipped when their results are there, so a killed
run resumes where it stopped and ``stop_after`` lets a user run stages on different machines
(the sweep on a cluster, the rest on a laptop):

1. ``calibrate``: activation ranges and float references on the calibration prompts;
2. ``sensitivity``: the metric-decoupled per-layer sweeps (SQNR for every layer, SSIM for the
   content layers; weights and activations at 2/4/8 bits), for methods whose allocator reads
   them. Without BOS-aware quantization the BOS layers' scores change, so such a method
   sweeps them again with BOS handling off;
3. ``weights``: the method's weight candidates (its `Allocator`), activations float, the one
   with the lowest image MSE vs float on the held-out selection prompts;
4. ``acts``: the protected layers and the activation candidates given the chosen weights,
   picked the same way (the official pipeline's order: weights first);
5. ``reconstruct`` (methods with refiners: learned rounding, PTQD, your own): the method's
   `Refiner` steps in order on the chosen bits; later stages run the refined `QuantizedUNet`;
6. ``export``: the chosen configuration as a quantized pipeline folder (`mixdq export`);
7. ``report``: chosen and effective bits, stored size, images vs float.

The testbed study (`mixdq_jax.study`) calls the same :class:`Recipe` for every row.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from tqdm import tqdm

from mixdq_jax.allocation import average_bits
from mixdq_jax.batch_render import PARALLEL, BatchRenderer, RenderSettings
from mixdq_jax.calibrate import CalibConfig, calibrate
from mixdq_jax.evaluation.bops import compute_cost, spec_ranks
from mixdq_jax.io_utils import atomic_write_json, atomic_write_text
from mixdq_jax.methods import (
    INT,
    AllocationContext,
    AllocationOptions,
    Bits,
    Format,
    Layers,
    Method,
    RefineContext,
    Sensitivities,
    Target,
    bits_summary,
    fingerprint,
)
from mixdq_jax.methods.lowrank import prepare as prepare_lowrank
from mixdq_jax.pipeline import Pipeline, QuantizedPipeline
from mixdq_jax.quant.lowrank import LowRank
from mixdq_jax.quant.qconfig import FLOAT_BITS, QConfig, QuantSpec, is_bos_layer
from mixdq_jax.quant.quantized import QuantizedUNet
from mixdq_jax.quant.registry import layer_splits, unet_layers
from mixdq_jax.recipe.config import PRESETS, Preset
from mixdq_jax.reconstruction import ReconConfig
from mixdq_jax.rundir import RunDir
from mixdq_jax.sensitivity import SweepConfig, sweep
from mixdq_jax.sensitivity.calibration import load_calibration
from mixdq_jax.sensitivity.evaluator import Evaluator

if TYPE_CHECKING:
    from mixdq_jax.evaluation.run import ReportEval

NO_BOS_SWEEPS = "sensitivity-nobos"
DEVICE_SELECTION_CHUNK = 8  # candidates per compiled call on an accelerator


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """Settings shared by every target and method of one run.

    ``calib_prompts`` drive calibration and the sweeps; ``select_prompts`` (held out from
    calibration) pick among candidates by image MSE vs float (by the preset's
    ``selection``). ``knobs``: the allocation's options (``None``: the preset's,
    `Preset.knobs`). ``height``/``width``: ``None`` is the model's native size.
    ``reconstruction``: the settings of the ``reconstruct`` stage (methods with learned
    rounding). ``selection_chunk``: candidates rendered per compiled call in the picks
    (`mixdq_jax.batch_render`; 1: one pipeline call each; ``None``: 1 on a CPU, where
    batching measured slower, 8 elsewhere); ``selection_parallel``: ``"vmap"`` or ``"map"``
    over a chunk (``None``: `batch_render.default_parallel`).
    """

    calib_prompts: tuple[str, ...]
    select_prompts: tuple[str, ...]
    preset: Preset = PRESETS["ours"]
    knobs: AllocationOptions | None = None
    steps: int = 1
    guidance_scale: float = 0.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    batch_size: int = 8
    chunk: int = 8
    reconstruction: ReconConfig = field(default_factory=ReconConfig)
    selection_chunk: int | None = None
    selection_parallel: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "calib_prompts", tuple(self.calib_prompts))
        object.__setattr__(self, "select_prompts", tuple(self.select_prompts))
        if self.knobs is None:
            object.__setattr__(self, "knobs", self.preset.knobs())
        if not self.calib_prompts or not self.select_prompts:
            raise ValueError("the recipe needs calibration prompts and selection prompts")
        if self.steps < 1 or self.batch_size < 1 or self.chunk < 1:
            raise ValueError("steps, batch_size and chunk must be >= 1")
        if self.selection_chunk is not None and self.selection_chunk < 1:
            raise ValueError(f"selection_chunk must be >= 1, got {self.selection_chunk}")
        if self.selection_parallel not in (None, *PARALLEL):
            raise ValueError(
                f"selection_parallel must be one of {PARALLEL}, got {self.selection_parallel!r}"
            )

    @property
    def chosen_selection_chunk(self) -> int:
        """``selection_chunk``, or its default on this backend."""
        if self.selection_chunk is not None:
            return self.selection_chunk
        return 1 if jax.default_backend() == "cpu" else DEVICE_SELECTION_CHUNK


@dataclass(frozen=True, kw_only=True)
class ChosenBits:
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
    if not method.format.exportable and out is not None:
        raise ValueError(
            f"{method.title} is a fake-quant baseline: its format {method.format.name} has no "
            "packed export (drop --out)"
        )


def log(message: str) -> None:
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
        self._sens: dict[tuple[bool, str], Sensitivities] = {}
        self._lowranks: dict[tuple[str, bool], dict[str, LowRank]] = {}
        self._evaluator: Evaluator | None = None
        self._reference: np.ndarray | None = None
        self._first_reference: np.ndarray | None = None
        self._renderers: dict[str, BatchRenderer] = {}
        self._ranges: dict[str, np.ndarray] | None = None
        self._learned: dict[str, QuantizedUNet] = {}
        self._chosen: dict[str, ChosenBits] = {}
        self._calibrated = False

    # ---------------------------------------------------------------- calibrate, sensitivity
    def calibrate(self) -> None:
        """Stage ``calibrate`` (run or resumed; once per `Recipe`: every row shares it)."""
        if self._calibrated:
            return
        c, p = self.config, self.config.preset
        calibrate(
            self.pipe,
            CalibConfig(
                prompts=c.calib_prompts, num_inference_steps=c.steps,
                guidance_scale=c.guidance_scale, height=self.height, width=self.width,
                seed=c.seed, batch_size=c.batch_size, method=p.range_method,
                momentum=p.momentum, observe_weight_bits=p.observe_weight_bits,
                symmetric_weights=p.symmetric_weights, ema_updates=p.ema_updates,
                observe_act_bits=p.observe_act_bits,
            ),
            self.run,
        )  # fmt: skip
        self._calibrated = True

    def _sweep(
        self, run: RunDir, *, bos_aware: bool, layers: Sequence[str] | None, fmt: Format = INT
    ) -> Any:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.pipe, load_calibration(self.run, self.pipe))
        spec = QuantSpec(bos_aware=bos_aware, **self._format_options(fmt, bos_aware))
        sweep_config = SweepConfig(
            chunk=self.config.chunk, spec=spec, layers=layers, sqnr=self.config.preset.sqnr
        )
        return sweep(self.pipe, run, sweep_config, evaluator=self._evaluator)

    def sensitivities(self, *, bos_aware: bool = True, fmt: Format = INT) -> Sensitivities:
        """The metric-decoupled sweeps (run or resumed) in ``fmt`` (its own folder for a
        format other than the int grid's). ``bos_aware=False``: the BOS layers' scores
        measured with BOS handling off (every other layer's single-layer score does not
        depend on it)."""
        key = (bos_aware, fmt.name)
        if key not in self._sens:
            main = self.run if fmt.sweeps is None else self.run.with_sensitivity(fmt.sweeps)
            sens = dict(self._sweep(main, bos_aware=True, layers=None, fmt=fmt))
            if not bos_aware:
                bos = [n for n in self.layers.names if is_bos_layer(n)]
                if bos:
                    name = NO_BOS_SWEEPS if fmt.sweeps is None else f"{fmt.sweeps}-nobos"
                    run = self.run.with_sensitivity(name)
                    for k, scores in self._sweep(run, bos_aware=False, layers=bos,
                                                 fmt=fmt).items():  # fmt: skip
                        sens[k] = {**sens[k], **scores}
            self._sens[key] = sens
        return self._sens[key]

    def lowrank(self, fmt: Format, *, bos_aware: bool = True) -> dict[str, LowRank]:
        """Stage ``lowrank``: the per-layer smoothing and branch of ``fmt`` (run or
        resumed; `mixdq_jax.methods.lowrank`): one search per BOS handling."""
        key = (fmt.name, bos_aware)
        if key not in self._lowranks:
            self.calibrate()
            self._lowranks[key] = prepare_lowrank(
                self.pipe, self.run, load_calibration(self.run, self.pipe), fmt,
                bos_aware=bos_aware,
            )  # fmt: skip
        return self._lowranks[key]

    def _format_options(self, fmt: Format, bos_aware: bool) -> dict[str, Any]:
        lowrank = None if fmt.lowrank is None else self.lowrank(fmt, bos_aware=bos_aware)
        return fmt.spec_options(
            symmetric_weights=self.config.preset.symmetric_weights, lowrank=lowrank
        )

    # ---------------------------------------------------------------- configurations, images
    def spec(self, method: Method, w_bits: Mapping[str, int], a_bits: Mapping[str, int]):
        return QuantSpec(
            weight_bits=dict(w_bits),
            act_bits=dict(a_bits),
            bos_aware=method.bos_aware,
            **self._format_options(method.format, method.bos_aware),
        )

    def qconfig(self, method: Method, w_bits: Mapping[str, int], a_bits: Mapping[str, int]):
        if self._ranges is None:  # read once: the selection builds hundreds of configs
            self._ranges = self.run.act_ranges()
        return self.spec(method, w_bits, a_bits).to_qconfig(self.splits, self._ranges)

    def render(
        self, qconfig: QConfig | None = None, *, quantized: QuantizedUNet | None = None,
        count: int | None = None,
    ) -> np.ndarray:  # fmt: skip
        """The selection prompts' images (``[N, H, W, 3]`` in [0, 1]); batch ``b`` uses seed
        ``seed + b``. A configuration whose images hold NaN/inf is an error naming the stage
        (it would otherwise score NaN and win or lose the selection at random). ``qconfig``:
        fake quantization of the float UNet; ``quantized``: a refined UNet (`quantized`);
        ``count``: only the first ``count`` prompts."""
        c, pipe = self.config, self.pipe
        prompts = list(c.select_prompts)[:count]
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
                        quantized=quantized,
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

    def selection_error(self, qconfig: QConfig) -> float:
        """What the candidate pick minimises (the preset's ``selection``): the image MSE vs
        float on every selection prompt, or the released pick's `released_pixel_error` on
        the first prompt alone."""
        if self.config.preset.selection == "mse":
            return self.image_mse(qconfig)
        if self._first_reference is None:  # one float image, kept in memory (cheap)
            self._first_reference = self.render(None, count=1)
        return released_pixel_error(self.render(qconfig, count=1), self._first_reference)

    def selection_errors(
        self, qconfigs: Iterable[QConfig], *, chunk: int | None = None
    ) -> Iterator[tuple[range, list[float]]]:
        """`selection_error` of many configurations, ``(indices, errors)`` per chunk: the
        candidates rendered ``chunk`` at a time through one compiled program
        (`mixdq_jax.batch_render`; default ``config.chosen_selection_chunk``; 1: a pipeline
        call each, as `selection_error`, built one at a time from a lazy ``qconfigs``)."""
        chunk = self.config.chosen_selection_chunk if chunk is None else chunk
        if chunk == 1:
            for i, qconfig in enumerate(qconfigs):
                yield range(i, i + 1), [self.selection_error(qconfig)]
            return
        c = self.config
        released = c.preset.selection == "released"
        if released and self._first_reference is None:
            self._first_reference = self.render(None, count=1)
        kind = "released" if released else "mse"
        renderer = self._renderers.get(kind)
        if renderer is None:
            settings = RenderSettings(
                prompts=c.select_prompts[:1] if released else c.select_prompts, steps=c.steps,
                guidance_scale=c.guidance_scale, height=self.height, width=self.width,
                seed=c.seed, batch_size=c.batch_size,
            )  # fmt: skip
            renderer = self._renderers[kind] = BatchRenderer(
                self.pipe, settings, parallel=c.selection_parallel
            )
        ref = self._first_reference if released else self.reference()
        for idx, images in renderer.render(list(qconfigs), chunk=chunk):
            if released:
                yield idx, [released_pixel_error(im, ref) for im in images]
            else:
                yield idx, [float(np.mean((im - ref) ** 2)) for im in images]

    # ---------------------------------------------------------------- allocation stages
    def _settings(self, target: Target, method: Method) -> dict[str, Any]:
        c = self.config
        return {
            "target": target.name, "method": method.settings(), "preset": c.preset.settings(),
            "knobs": _knob_settings(c.knobs), "select_prompts": list(c.select_prompts),
            "seed": c.seed,
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
        """The candidate with the lowest `selection_error`; scores are written as they go."""
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
            qconfigs = (qconfig_of(candidates[i]) for i in todo)
            for idx, errors in self.selection_errors(qconfigs):
                for j, error in zip(idx, errors, strict=True):
                    scores[fingerprints[todo[j]]] = error
                self.run.write_candidate_scores(
                    key, kind, {"candidates": listing, "scores": scores}
                )
                bar.update(len(idx))
        best = min(range(len(candidates)), key=lambda i: (scores[fingerprints[i]], i))
        return dict(candidates[best])

    def context(self, target: Target, method: Method) -> AllocationContext:
        """What ``method``'s allocator reads; the sweeps run (or resume) on first use, with
        the method's BOS handling."""
        return AllocationContext(
            layers=self.layers, knobs=self.config.knobs, target=target,
            scores=lambda: self.sensitivities(bos_aware=method.bos_aware, fmt=method.format),
        )  # fmt: skip

    def _start(self, target: Target, method: Method) -> str:
        check_request(target, method)
        key = recipe_key(target, method)
        self.run.start_recipe(key, self._settings(target, method))
        return key

    def weights(self, target: Target, method: Method) -> Bits:
        """Stage ``weights``: the chosen weight bits (activations float while choosing)."""
        key = self._start(target, method)
        chosen = self.run.chosen_bits(key, "weight", self.layers.names)  # names an edited file
        if chosen is None:
            cands = method.allocator.weights(self.context(target, method))
            floats = dict.fromkeys(self.layers.names, FLOAT_BITS)
            chosen = self._pick(
                key, "weight", cands, lambda w: self.qconfig(method, w, floats), self.layers.w_size
            )
            self.run.write_chosen_bits(key, "weight", chosen)
        return chosen

    def acts(self, target: Target, method: Method) -> Bits:
        """Stage ``acts``: the protected layers and the chosen activation bits given the
        chosen weights (A16: every activation float, nothing to choose)."""
        w_bits = self.weights(target, method)
        key = recipe_key(target, method)
        chosen = self.run.chosen_bits(key, "act", self.layers.names)
        if chosen is None:
            if target.quantizes_acts:
                ctx = self.context(target, method)
                cands = method.allocator.acts(ctx, method.allocator.protected(ctx))
            else:
                cands = [dict.fromkeys(self.layers.names, FLOAT_BITS)]
            chosen = self._pick(
                key, "act", cands, lambda a: self.qconfig(method, w_bits, a), self.layers.a_size
            )
            self.run.write_chosen_bits(key, "act", chosen)
        return chosen

    def allocation(self, target: Target, method: Method) -> ChosenBits:
        """Stages ``weights`` and ``acts`` of one (target, method), run or resumed (once per
        `Recipe`: later stages ask again)."""
        key = recipe_key(target, method)
        if key not in self._chosen:
            w_bits, a_bits = self.weights(target, method), self.acts(target, method)
            self._chosen[key] = ChosenBits(
                target=target, method=method, weight_bits=w_bits, act_bits=a_bits,
                spec=self.spec(method, w_bits, a_bits),
            )  # fmt: skip
        return self._chosen[key]

    # ---------------------------------------------------------------- reconstruct
    def refine_context(self, key: str) -> RefineContext:
        return RefineContext(pipe=self.pipe, run=self.run, key=key,
                             recon=self.config.reconstruction)  # fmt: skip

    def learned(self, allocation: ChosenBits) -> QuantizedUNet:
        """Stage ``reconstruct``: the allocation as a `QuantizedUNet` after the method's
        refiners (run or resumed): without refiners, the float UNet params and the
        calibrated ranges."""
        if allocation.key not in self._learned:
            w, a = allocation.weight_bits, allocation.act_bits
            model = QuantizedUNet(
                params=self.pipe.params["unet"], qconfig=self.qconfig(allocation.method, w, a),
                act_ranges=dict(self.run.act_ranges()),
            )  # fmt: skip
            ctx = self.refine_context(allocation.key)
            for refiner in allocation.method.refiners:
                model = refiner.refine(model, ctx)
            self._learned[allocation.key] = model
        return self._learned[allocation.key]

    def quantized(self, allocation: ChosenBits) -> QuantizedUNet:
        """``allocation`` as it is exported: after the method's refiners (learned UNet
        params, learned activation ranges, PTQD's correction), its configuration built from
        the chosen bits and those ranges."""
        model = self.learned(allocation)
        spec = self.spec(allocation.method, allocation.weight_bits, allocation.act_bits)
        return model.replace(qconfig=spec.to_qconfig(self.splits, model.act_ranges))

    def bound(self, allocation: ChosenBits) -> QuantizedPipeline:
        """The float pipeline bound to :meth:`quantized` (what evaluation renders)."""
        return QuantizedPipeline(self.pipe, self.quantized(allocation))

    def labels(self, allocation: ChosenBits) -> dict[str, Any]:
        """What a row is, as every report and export states it: the preset, the integer
        program's objective (None: the allocator reads no scores) and the method's settings."""
        method = allocation.method
        return {
            "preset": self.config.preset.name,
            "objective": self.config.knobs.objective if method.allocator.uses_scores else None,
            "method_settings": method.settings(),
        }

    def summary(self, allocation: ChosenBits) -> dict[str, Any]:
        """The numbers every report row states: what the row is (`labels`), average bits,
        the stored UNet size (None for a format without a packed export) and the paper's
        Compute Opt."""
        from mixdq_jax.deploy.memory import stored_param_bytes  # noqa: PLC0415

        unet_config = self.pipe.unet.config
        exportable = allocation.method.format.exportable
        return {
            **self.labels(allocation),
            **bits_summary(allocation.weight_bits, allocation.act_bits, self.layers),
            "unet_mb": stored_param_bytes(unet_config, allocation.spec) / 1e6
            if exportable else None,
            # the paper's Compute Opt.: bit operations of one UNet forward vs FP16 (a low-rank
            # branch counted at 16 x 16)
            "compute_opt": compute_cost(
                unet_config, allocation.weight_bits, allocation.act_bits,
                ranks=spec_ranks(unet_config, allocation.spec),
            )["compute_opt"],
        }  # fmt: skip

    # ---------------------------------------------------------------- export, report
    def export(
        self, allocation: ChosenBits, out: str | Path, *, overwrite: bool = False
    ) -> dict[str, Any]:
        """Stage ``export``: the quantized folder (skipped when ``out`` already holds it,
        every file verified against its manifest; a damaged one is exported again, saying
        what was damaged; ``overwrite``: as `mixdq export --overwrite`)."""
        from mixdq_jax.deploy.checkpoint import (  # noqa: PLC0415
            export_quantized_pipeline,
            verified_export,
        )
        from mixdq_jax.deploy.export_folder import describe_problems  # noqa: PLC0415

        check_request(allocation.target, allocation.method, out)
        out = Path(out)
        recorded = self.run.export_record(allocation.key)
        if recorded is not None:
            meta, problems = verified_export(out)
            if meta is not None and not problems and recorded.get("meta") == _jsonable(meta):
                return meta
            if problems:
                log(f"{out}: the export there is not intact ({describe_problems(problems)}); "
                    "exporting it again")  # fmt: skip
        labels = self.labels(allocation)
        recipe = {
            "method": allocation.method.name,
            "target": allocation.target.name,
            "preset": labels["preset"],
            "objective": labels["objective"],
        }
        meta = export_quantized_pipeline(
            self.pipe, allocation.spec, out, unet=self.learned(allocation), overwrite=overwrite,
            recipe=recipe,
        )  # fmt: skip
        self.run.write_export_record(allocation.key, {"out": str(out), "meta": _jsonable(meta)})
        return meta

    def report(
        self,
        allocation: ChosenBits,
        out: str | Path | None = None,
        evaluation: ReportEval | None = None,
    ) -> dict[str, Any]:
        """Stage ``report``: bits (effective ones count float layers at 16), the stored
        UNet size, and the selection images vs float; with ``evaluation`` also the paper's
        metrics (`evaluate`); ``report.json`` and ``report.md``."""
        from mixdq_jax.deploy.memory import stored_param_bytes  # noqa: PLC0415
        from mixdq_jax.metrics import psnr, ssim_global  # noqa: PLC0415

        method = allocation.method
        quantized = self.quantized(allocation)
        images, ref = self.render(quantized=quantized) * 255.0, self.reference() * 255.0
        float_mb = stored_param_bytes(self.pipe.unet.config, None) / 1e6
        summary = self.summary(allocation)
        report = {
            "target": allocation.target.name,
            "method": method.name,
            "model": str(self.pipe.source),
            **summary,
            "float_unet_mb": float_mb,
            "storage_opt": None if summary["unet_mb"] is None else float_mb / summary["unet_mb"],
            "selection_prompts": len(self.config.select_prompts),
            "mse_vs_fp": float(np.mean((images / 255.0 - ref / 255.0) ** 2)),
            "psnr_vs_fp": float(np.mean(psnr(images, ref, axis=(-3, -2, -1)))),
            "ssim_vs_fp": float(np.mean(ssim_global(images, ref))),
            "out": None if out is None else str(out),
        }
        model, ctx = self.learned(allocation), self.refine_context(allocation.key)
        for refiner in method.refiners:
            report.update(refiner.report(model, ctx))
        if evaluation is not None:
            report["evaluation"] = self.evaluate(allocation, evaluation)
        json_path, md_path = self.run.recipe_report_paths(allocation.key)
        atomic_write_json(json_path, report)
        atomic_write_text(md_path, report_markdown(report))
        return report

    def evaluate(
        self,
        allocation: ChosenBits | None,
        evaluation: ReportEval,
        *,
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
                                     "preset": c.preset.settings()}),
            }  # fmt: skip
            load_float = self._float_pipe
            out = out or self.run.recipe_dir(allocation.key) / "evaluation"
        generation = GenerationSettings(
            steps=c.steps, seed=c.seed, height=self.height, width=self.width,
            guidance_scale=c.guidance_scale, batch=evaluation.batch,
        )  # fmt: skip
        subject = Subject(
            pipe=self.pipe if allocation is None else self.bound(allocation), identity=identity,
            quantization=quantization, qconfig=None, float_identity=identity,
            load_float=load_float,
        )  # fmt: skip
        log(f"evaluation of {quantization if allocation is None else allocation.key} on "
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


def released_pixel_error(images: np.ndarray, reference: np.ndarray) -> float:
    """The released final pick's score (its ``MSE_pixel``): both images as the 8-bit PNGs it
    saves (``round(255 x)``), then ``mean((a - b) ** 2)`` computed in uint8, so differences
    and squares wrap modulo 256 (its ``cv2.imread`` arrays are uint8)."""
    a = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    b = np.round(np.clip(reference, 0.0, 1.0) * 255.0).astype(np.uint8)
    d = a - b
    return float(np.mean(d * d))


def _knob_settings(knobs: AllocationOptions) -> dict[str, Any]:
    """The allocation options a resumed run must match; the fields the recipe's options
    did not have before they became `mixdq allocate`'s too (``k``, the candidate lists) only
    when set, so earlier runs still resume."""
    out = asdict(knobs)
    for name in ("k", "content_bits", "quality_bits"):
        if out[name] is None:
            del out[name]
    if out.get("budget_rule") == "ours":  # added later: recorded only when not the default
        del out["budget_rule"]
    return out


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

    fitted = report.get("ptqd_k_fitted")
    dropped = "" if fitted is None or fitted == report["ptqd_k"] else (
        f" (fitted {steps('ptqd_k_fitted')}: the released rule keeps k > 0 only)"
    )
    rule = f" ({report['ptqd_rule']} fit)" if report.get("ptqd_rule") else ""
    return [
        f"- PTQD{rule} per sampling step: slope k {steps('ptqd_k')}{dropped}, residual std "
        f"{steps('ptqd_std')}, fresh noise kept x {steps('ptqd_noise_scale')}"
    ]


def report_markdown(report: Mapping[str, Any]) -> str:
    """A few lines a person reads: what was chosen and what it costs."""
    floats = report["act_float_layers"]
    return "\n".join(
        [
            f"# mixdq quantize: {report['target']} {report['method']} ({report['preset']} preset"
            + (f", {report['objective']} objective)" if report.get("objective") else ")"),
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
