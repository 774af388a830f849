"""The ``ptqd`` refiner: PTQD's correction of the quantized UNet's output noise.

Fits PTQD's noise model (`mixdq_jax.reconstruction.ptqd.fit_noise`) on the calibration
inputs, the calibration's float outputs against the quantized model's: one sampling step
folds the correction into ``conv_out`` (the codes do not change), several steps keep it
beside the UNet (`QuantizedUNet.correction`: the sampling loop applies it and the export
stores it). ``rule``: ``"released"`` (default; the authors' code: slopes kept only where
``k > 0``, the raw error's channel bias, the mean of per-sample spreads, fitted on the
classifier-free-guided outputs as their sampler collects them) or ``"pooled"`` (our earlier
fit on the UNet's own output rows: every slope, the residual's bias, one pooled spread); the
method ``ptqd-pooled`` runs the latter. ``settings()`` names the rule.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.io_utils import atomic_write_json
from mixdq_jax.methods.refiner import RefineContext, Refiner
from mixdq_jax.quant.forward import forward
from mixdq_jax.quant.qconfig import QConfig
from mixdq_jax.quant.quantized import QuantizedUNet
from mixdq_jax.reconstruction.ptqd import RULES, fit_noise, fold_into_output_layer
from mixdq_jax.schedulers.noise_correction import NoiseModel


@dataclass(frozen=True, kw_only=True)
class PTQDCorrection(Refiner):
    """PTQD's correlated correction and bias, and on several steps its variance part, fitted
    by ``rule`` (`mixdq_jax.reconstruction.ptqd.RULES`)."""

    name: ClassVar[str] = "ptqd"
    rule: str = "released"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"PTQDCorrection: rule {self.rule!r} is not one of {RULES}")

    def refine(self, model: QuantizedUNet, ctx: RefineContext) -> QuantizedUNet:
        pipe, calib = ctx.pipe, ctx.calibration
        timesteps = pipe.scheduler.set_timesteps(calib.steps).timesteps
        float_out = calib_outputs(calib)
        quant_out = quantized_outputs(pipe, model.params, model.qconfig, calib)
        if self.rule == "released" and pipe.uses_cfg(calib.guidance):
            float_out, quant_out = (guided(a, calib) for a in (float_out, quant_out))
        noise = fit_noise(float_out, quant_out, timesteps=timesteps, rule=self.rule)
        atomic_write_json(ctx.store(self.name) / "noise_model.json", noise.as_dict())
        if noise.fitted_k is not None and np.any(noise.k != noise.fitted_k):
            ctx.log(f"PTQD ({self.rule} rule): fitted slopes {np.round(noise.fitted_k, 5)}; "
                    f"applied {noise.k.tolist()} (only k > 0 is kept)")  # fmt: skip
        if calib.steps == 1:  # a linear map of the output: free inside conv_out
            return model.replace(params=fold_into_output_layer(model.params, noise))
        return model.replace(correction=noise)

    def settings(self) -> dict[str, Any]:
        return {"ptqd": True, "ptqd_rule": self.rule}

    def report(self, model: QuantizedUNet, ctx: RefineContext) -> dict[str, Any]:
        """The rule, the applied and fitted slope and the residual per sampling step, and the
        fresh noise kept."""
        path = ctx.store(self.name) / "noise_model.json"
        noise = NoiseModel.from_dict(json.loads(path.read_text()), what=str(path))
        plan = ctx.pipe.scheduler.set_timesteps(noise.steps)  # not the calibration: no I/O
        kept = noise.for_plan(ctx.pipe.scheduler, plan).noise_scale
        fitted = noise.k if noise.fitted_k is None else noise.fitted_k
        return {"ptqd_rule": self.rule, "ptqd_k": noise.k.tolist(),
                "ptqd_k_fitted": np.asarray(fitted).tolist(), "ptqd_std": noise.std.tolist(),
                "ptqd_noise_scale": np.asarray(kept, np.float64).tolist()}  # fmt: skip


def calib_outputs(calib: Any) -> np.ndarray:
    """The float UNet outputs ``[steps, N, ...]`` of every calibration batch."""
    return np.concatenate([b.outputs for b in calib.batches], axis=1)


def quantized_outputs(pipe: Any, params: Any, qconfig: QConfig, calib: Any) -> np.ndarray:
    """The UNet outputs ``[steps, N, ...]`` under ``qconfig`` on the calibration inputs."""
    timesteps = pipe.scheduler.set_timesteps(calib.steps).timesteps
    run = jax.jit(lambda p, q, x, t, c: forward(pipe.unet, p, q, x, t, c))
    per_batch = []
    for batch in calib.batches:
        pooled = None if batch.pooled is None else jnp.asarray(batch.pooled)
        cond = pipe.conditioning(jnp.asarray(batch.context), pooled, calib.guidance,
                                 calib.height, calib.width)  # fmt: skip
        outs = [
            np.asarray(run(params, qconfig, jnp.asarray(batch.inputs[s]), timesteps[s], cond))
            for s in range(batch.inputs.shape[0])
        ]
        per_batch.append(np.stack(outs))
    return np.concatenate(per_batch, axis=1)


def guided(outputs: np.ndarray, calib: Any) -> np.ndarray:
    """``[steps, R, ...]`` outputs of every calibration batch (``R = 2B`` rows, each batch's
    ``[negative; positive]``) guided as the sampler guides them: ``[steps, B, ...]``."""
    rows = [b.outputs.shape[1] for b in calib.batches]
    parts = np.split(outputs, np.cumsum(rows)[:-1], axis=1)
    g = float(calib.guidance)
    out = []
    for part in parts:
        uncond, text = np.split(part, 2, axis=1)
        out.append(uncond + g * (text - uncond))
    return np.concatenate(out, axis=1)
