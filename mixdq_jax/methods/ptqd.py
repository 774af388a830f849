"""The ``ptqd`` refiner: PTQD's correction of the quantized UNet's output noise.

Fits PTQD's noise model (`mixdq_jax.reconstruction.ptqd.fit_noise`) on the calibration
inputs, the calibration's float outputs against the quantized model's: one sampling step
folds the correlated correction into ``conv_out`` (the codes do not change), several steps
keep it beside the UNet (`QuantizedUNet.correction`: the sampling loop applies it and the
export stores it).
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
from mixdq_jax.reconstruction.ptqd import fit_noise, fold_into_output_layer
from mixdq_jax.schedulers.noise_correction import NoiseModel


@dataclass(frozen=True, kw_only=True)
class PTQDCorrection(Refiner):
    """PTQD's correlated correction and bias, and on several steps its variance part."""

    name: ClassVar[str] = "ptqd"

    def refine(self, model: QuantizedUNet, ctx: RefineContext) -> QuantizedUNet:
        pipe, calib = ctx.pipe, ctx.calibration
        timesteps = pipe.scheduler.set_timesteps(calib.steps).timesteps
        noise = fit_noise(calib_outputs(calib),
                          quantized_outputs(pipe, model.params, model.qconfig, calib),
                          timesteps=timesteps)  # fmt: skip
        atomic_write_json(ctx.store(self.name) / "noise_model.json", noise.as_dict())
        if calib.steps == 1:  # a linear map of the output: free inside conv_out
            return model.replace(params=fold_into_output_layer(model.params, noise))
        return model.replace(correction=noise)

    def settings(self) -> dict[str, Any]:
        return {"ptqd": True}

    def report(self, model: QuantizedUNet, ctx: RefineContext) -> dict[str, Any]:
        """The fitted slope and residual per sampling step, and the fresh noise kept."""
        path = ctx.store(self.name) / "noise_model.json"
        noise = NoiseModel.from_dict(json.loads(path.read_text()), what=str(path))
        plan = ctx.pipe.scheduler.set_timesteps(noise.steps)  # not the calibration: no I/O
        kept = noise.for_plan(ctx.pipe.scheduler, plan).noise_scale
        return {"ptqd_k": noise.k.tolist(), "ptqd_std": noise.std.tolist(),
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
