"""PTQD (He et al. 2023): fit the quantization noise of the noise prediction.

PTQD splits the quantized model's output error ``D = eps_q - eps`` into a part correlated with
the float output and a residual: ``D = k eps + D'`` (``k`` by least-squares regression, with
an intercept, of ``D`` on ``eps`` over every element of the calibration outputs, per sampling
step). Then ``eps_q = (1 + k) eps + D'`` and the correlated part is undone by
``eps_hat = (eps_q - mu) / (1 + k)``, ``mu`` a channel-wise mean of the error (PTQD's bias
correction). What is left has standard deviation ``sigma / (1 + k)``, which a stochastic
sampler absorbs by adding less fresh noise (PTQD's variance schedule calibration). How the
sampling loop applies both: `mixdq_jax.schedulers.noise_correction`.

Two rules (``rule``):

- ``"released"`` (the default): what the authors' code (ziplab/PTQD) computes.
  ``quant_scripts/analyze_error.py`` fits ``k`` by ``scipy.stats.linregress`` per timestep
  (l. 51-57); the sampler keeps it only where ``k > 0``, else uses 0
  (``ldm/models/diffusion/ddim.py`` l. 438-446; the std's residual uses ``relu(k)`` too,
  analyze_error.py l. 72-77); the bias is the channel mean of the *raw* error ``D``
  (analyze_error.py l. 10-29: spatial means per sample, averaged over the step's samples), and
  is subtracted at every step whatever ``k`` (ddim.py l. 630-631); ``sigma`` is the mean over
  the step's samples of each sample's standard deviation of ``D - relu(k) eps`` over all its
  elements (``torch.std``, unbiased; analyze_error.py l. 77-85). The errors are those of the
  guided outputs (ddim.py l. 384-393); :func:`fit_noise` takes whatever outputs it is given.
  So where every fitted slope is <= 0 nothing correlated is applied: the bias is still
  subtracted and the variance part still uses the raw error's spread.
- ``"pooled"``: our earlier fit, kept as an option: every slope applied as fitted (negative
  ones too), the bias the channel mean of the residual ``D - k eps``, ``sigma`` the standard
  deviation of the residual less its channel means, pooled over every element of the step.

Either way, with one sampling step (SDXL-turbo) only the correlated correction and the bias
apply (the last step adds no fresh noise), a linear function of the output, so it is folded
into the last layer (:func:`fold_into_output_layer`: ``conv_out``'s kernel and bias, per
output channel): the per-channel weight grid is scale-invariant, so the weight codes do not
change and the correction costs nothing at run time; with ``k = 0`` only the bias moves.
Several steps keep the model beside the UNet (the pipeline's ``noise_model``, stored in the
exported folder).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mixdq_jax.schedulers.noise_correction import NoiseModel

RULES = ("released", "pooled")
"""How :func:`fit_noise` turns the regression into the noise model (see the module doc)."""


def fit_noise(
    float_out: Any,
    quant_out: Any,
    *,
    timesteps: Any,
    channel_axis: int = 1,
    rule: str = "released",
) -> NoiseModel:
    """PTQD's noise model from ``[steps, N, ...]`` float and quantized UNet outputs on the same
    inputs at the schedule's ``timesteps`` ``[steps]`` (``channel_axis`` counts within one
    step's ``[N, ...]`` array: 1 for NCHW), by ``rule`` (:data:`RULES`)."""
    if rule not in RULES:
        raise ValueError(f"fit_noise: rule {rule!r} is not one of {RULES}")
    eps = np.asarray(float_out, np.float64)
    eps_q = np.asarray(quant_out, np.float64)
    if eps.shape != eps_q.shape or eps.ndim < 3:
        raise ValueError(
            f"fit_noise: float and quantized outputs must share a [steps, N, ...] shape, got "
            f"{eps.shape} and {eps_q.shape}"
        )
    fitted, ks, biases, stds = [], [], [], []
    for e, q in zip(eps, eps_q, strict=True):
        err = q - e
        k = _slope(e, err)
        if rule == "released":
            applied = max(k, 0.0)
            bias = _channel_mean(err, channel_axis)
            residual = (err - applied * e).reshape(err.shape[0], -1)
            std = float(np.mean(np.std(residual, axis=1, ddof=1)))
        else:
            applied = k
            residual = err - k * e
            bias = _channel_mean(residual, channel_axis)
            std = float(np.std(np.moveaxis(residual, channel_axis, -1) - bias))
        fitted.append(k)
        ks.append(applied)
        biases.append(bias)
        stds.append(std)
    return NoiseModel(
        timesteps=np.asarray(timesteps, np.float64).reshape(-1), k=np.asarray(ks),
        bias=np.stack(biases), std=np.asarray(stds),
        fitted_k=np.asarray(fitted) if rule == "released" else None,
    )  # fmt: skip


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    """The least-squares slope of ``y`` on ``x`` over every element (with an intercept)."""
    x, y = x.ravel(), y.ravel()
    var = np.var(x)
    if var == 0.0:
        raise ValueError("fit_noise: the float outputs of a step are constant")
    return float(np.mean((x - x.mean()) * (y - y.mean())) / var)


def _channel_mean(a: np.ndarray, channel_axis: int) -> np.ndarray:
    moved = np.moveaxis(a, channel_axis, -1)
    return moved.reshape(-1, moved.shape[-1]).mean(axis=0)


def fold_into_output_layer(
    params: Mapping[str, Any], model: NoiseModel, *, layer: str = "conv_out"
) -> dict[str, Any]:
    """``params`` with the one-step correction folded into ``layer`` (its kernel's last axis
    is the output channel): ``W / (1 + k)``, ``(b - bias) / (1 + k)``, in the params' dtype."""
    if model.k.shape[0] != 1:
        raise ValueError(
            f"PTQD folding takes a one-step noise model, got {model.k.shape[0]} steps: a "
            "multi-step model needs the per-step correction in the sampling loop"
        )
    if layer not in params:
        raise ValueError(f"PTQD folding: no layer {layer!r} at the top of the params tree")
    node = dict(params[layer])
    kernel, bias = np.asarray(node["kernel"]), node.get("bias")
    if model.bias.shape[1] != kernel.shape[-1]:
        raise ValueError(
            f"PTQD folding: {model.bias.shape[1]} channel biases for {layer!r} with "
            f"{kernel.shape[-1]} outputs"
        )
    scale = 1.0 / (1.0 + float(model.k[0]))
    node["kernel"] = jnp.asarray((kernel.astype(np.float64) * scale).astype(kernel.dtype))
    b = np.zeros(kernel.shape[-1]) if bias is None else np.asarray(bias, np.float64)
    node["bias"] = jnp.asarray(((b - model.bias[0]) * scale).astype(kernel.dtype))
    return {**params, layer: node}
