"""PTQD (He et al. 2023): fit the quantization noise of the noise prediction.

PTQD splits the quantized model's output error ``D = eps_q - eps`` into a part correlated with
the float output and a residual: ``D = k eps + D'`` (``k`` by least-squares regression of
``D`` on ``eps`` over every element of the calibration outputs, per sampling step). Then
``eps_q = (1 + k) eps + D'`` and the correlated part is undone by
``eps_hat = (eps_q - mu) / (1 + k)``, ``mu`` being the residual's channel-wise mean (PTQD's
bias correction). What is left is ``D' / (1 + k)`` with variance ``sigma^2 / (1 + k)^2``,
which a stochastic sampler absorbs by adding less fresh noise (PTQD's variance schedule
calibration). How the sampling loop applies both: `mixdq_jax.schedulers.noise_correction`.

Where the paper leaves a choice:

- the regression has an intercept (the error's mean is not forced to 0) and the slope is
  pooled over channels; the residual's mean is then taken per channel (the "bias" of the
  uncorrelated part) and removed, its variance pooled;
- with one sampling step (SDXL-turbo) only the correlated correction applies (the paper says
  so) and it is a linear function of the output, so it is folded into the last layer
  (:func:`fold_into_output_layer`: ``conv_out``'s kernel and bias, per output channel): the
  per-channel weight grid is scale-invariant, so the weight codes do not change and the
  correction costs nothing at run time. Several steps keep the model beside the UNet (the
  pipeline's ``noise_model``, stored in the exported folder).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from mixdq_jax.schedulers.noise_correction import NoiseModel


def fit_noise(
    float_out: Any, quant_out: Any, *, timesteps: Any, channel_axis: int = 1
) -> NoiseModel:
    """PTQD's noise model from ``[steps, N, ...]`` float and quantized UNet outputs on the same
    inputs at the schedule's ``timesteps`` ``[steps]`` (``channel_axis`` counts within one
    step's ``[N, ...]`` array: 1 for NCHW)."""
    eps = np.asarray(float_out, np.float64)
    eps_q = np.asarray(quant_out, np.float64)
    if eps.shape != eps_q.shape or eps.ndim < 3:
        raise ValueError(
            f"fit_noise: float and quantized outputs must share a [steps, N, ...] shape, got "
            f"{eps.shape} and {eps_q.shape}"
        )
    ks, biases, stds = [], [], []
    for e, q in zip(eps, eps_q, strict=True):
        err = q - e
        x, y = e.ravel(), err.ravel()
        var = np.var(x)
        if var == 0.0:
            raise ValueError("fit_noise: the float outputs of a step are constant")
        k = float(np.mean((x - x.mean()) * (y - y.mean())) / var)
        residual = np.moveaxis(err - k * e, channel_axis, -1)
        bias = residual.reshape(-1, residual.shape[-1]).mean(axis=0)
        ks.append(k)
        biases.append(bias)
        stds.append(float(np.std(residual - bias)))
    return NoiseModel(
        timesteps=np.asarray(timesteps, np.float64).reshape(-1), k=np.asarray(ks),
        bias=np.stack(biases), std=np.asarray(stds),
    )  # fmt: skip


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
