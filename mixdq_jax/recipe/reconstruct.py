"""The recipe's ``reconstruct`` stage: learned rounding (and PTQD) on the chosen bits.

For a method with ``rounding="adaround"`` (Q-Diffusion, PTQD, MixDQ + AdaRound) the chosen
configuration is reconstructed unit by unit on the calibration run's UNet inputs (every
sampling step: `mixdq_jax.reconstruction.samples`), resumable in
``RUN/quantize/<key>/reconstruct/``. ``ptqd`` then fits PTQD's noise model on the same
inputs (the calibration's float outputs against the reconstructed model's): one step folds
the correction into ``conv_out``, several steps apply it in the sampling loop (the
pipeline's ``noise_model``, which the export stores). ``edadm`` (EDA-DM) first keeps the
calibration samples its TDAC chooses per sampling step (every sample at one step) and
reconstructs with its layer losses (``ReconConfig.layer_loss_weight`` from the method).
What comes out is what the later stages already take: a pipeline whose float UNet params
carry the learned codes, and activation ranges.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.io_utils import atomic_write_json
from mixdq_jax.pipeline import Pipeline
from mixdq_jax.quant.forward import forward
from mixdq_jax.quant.qconfig import QConfig
from mixdq_jax.reconstruction import ReconConfig, reconstruct, unet_apply
from mixdq_jax.reconstruction.calib_select import CalibSelect, feature_fn, select
from mixdq_jax.reconstruction.ptqd import NoiseModel, fit_noise, fold_into_output_layer
from mixdq_jax.reconstruction.samples import sample_positions, unet_samples
from mixdq_jax.rundir import RunDir
from mixdq_jax.sensitivity.calibration import CalibData, load_calibration


def needs_reconstruction(method: Any) -> bool:
    return method.rounding != "nearest" or method.ptqd


def reconstruct_stage(
    pipe: Pipeline,
    run: RunDir,
    key: str,
    qconfig: QConfig,
    method: Any,
    config: ReconConfig,
    *,
    progress: bool = True,
) -> tuple[Pipeline, dict[str, np.ndarray], NoiseModel | None]:
    """``(pipeline with the learned UNet params, activation ranges, PTQD noise model)`` of one
    recipe's chosen ``qconfig`` (run or resumed)."""
    calib = load_calibration(run, pipe)
    params, ranges = pipe.params["unet"], dict(run.act_ranges())
    if method.rounding == "adaround":
        data = unet_samples(pipe, calib)
        if method.calib_select:
            data, per_step = tdac_samples(pipe, calib, data, seed=config.seed)
            # what TDAC chose, beside the reconstruction it fed
            atomic_write_json(run.recipe_dir(key) / "calib_select.json",
                              {"samples_per_step": per_step})  # fmt: skip
            print(f"[mixdq quantize] EDA-DM's TDAC: calibration samples per sampling step "
                  f"{per_step}", file=sys.stderr, flush=True)  # fmt: skip
        if method.layer_loss_weight:
            config = replace(config, layer_loss_weight=method.layer_loss_weight)
        res = reconstruct(unet_apply(pipe.unet), params, qconfig, data, config=config,
                          run=run, key=key, progress=progress)  # fmt: skip
        params, qconfig = res.params, res.qconfig
        ranges.update(res.act_ranges)
    elif method.rounding != "nearest":
        raise ValueError(f"method {method.name!r}: unknown rounding {method.rounding!r}")
    if not method.ptqd:
        return pipe.with_params(unet=params), ranges, None
    timesteps = pipe.scheduler.set_timesteps(calib.steps).timesteps
    noise = fit_noise(calib_outputs(calib), quantized_outputs(pipe, params, qconfig, calib),
                      timesteps=timesteps)  # fmt: skip
    if calib.steps == 1:  # a linear map of the output: free inside conv_out
        return pipe.with_params(unet=fold_into_output_layer(params, noise)), ranges, noise
    return pipe.with_params(unet=params).with_noise_model(noise), ranges, noise


def tdac_samples(
    pipe: Pipeline, calib: CalibData, data: Any, *, seed: int = 0
) -> tuple[Any, list[int]]:
    """EDA-DM's TDAC: ``(the samples of data it keeps, how many per sampling step)``: one
    per trajectory (`unet_samples` order), spread over the steps by the float UNet's latent
    feature maps; all of them at one step."""
    step_of, trajectory_of = sample_positions(calib)
    features = feature_fn(unet_apply(pipe.unet), pipe.params["unet"], data)
    keep = select(step_of, trajectory_of, features, CalibSelect(seed=seed))
    per_step = np.bincount(step_of[keep], minlength=calib.steps).tolist()
    if keep.size == step_of.size:
        return data, per_step
    return jax.tree.map(lambda a: a[keep], data), per_step


def calib_outputs(calib: CalibData) -> np.ndarray:
    """The float UNet outputs ``[steps, N, ...]`` of every calibration batch."""
    return np.concatenate([b.outputs for b in calib.batches], axis=1)


def quantized_outputs(pipe: Pipeline, params: Any, qconfig: QConfig, calib: CalibData):
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
