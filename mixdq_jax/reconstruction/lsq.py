"""Learned activation step sizes (LSQ, Esser et al. 2020) on the project's one grid.

An activation quantizer is the grid of a range ``[lo, hi]`` (`pallas_kernels.grid`). LSQ
learns the step ``s`` with the zero point ``z`` of the calibrated range held fixed, so the
range is ``[-z s, (L - z) s]`` (``L = 2**b - 1``) and a learned step ends as an ordinary
calibrated range (:func:`step_range`) that the fake quantizer and the packer read unchanged.

The forward value is the grid's own ``dequantize(codes(x))``; the gradient is LSQ's straight
through estimator: ``round`` passes the gradient, ``clip`` stops it outside the range, which
gives ``d x_hat / d s = round(x/s) - x/s`` inside and ``-z`` or ``L - z`` outside; the step's
gradient is scaled by ``1 / sqrt(N L)`` (``N``: elements per sample), as LSQ prescribes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import grid

Array = jax.Array


def init_step(a_range: Array, bits: Array | int) -> tuple[Array, Array]:
    """``(step, zero)`` per input part (``[parts]`` each) of a ``[parts, 2]`` calibrated range."""
    a_range = jnp.asarray(a_range, jnp.float32).reshape(-1, 2)
    scale, zero, _ = grid.affine_params(a_range[:, 0], a_range[:, 1], bits)
    return scale, zero


def step_range(step: Array, zero: Array, bits: Array | int) -> Array:
    """The ``[parts, 2]`` range whose grid has step ``step`` and zero point ``zero``."""
    levels = grid.levels(bits)
    return jnp.stack([-zero * step, (levels - zero) * step], axis=-1)


def _scaled_gradient(x: Array, factor: Array | float) -> Array:
    """``x`` in the forward pass, ``factor * dx`` in the backward pass."""
    return jax.lax.stop_gradient(x - x * factor) + x * factor


def lsq_fake_quant(x: Array, step: Array, zero: Array, bits: Array | int) -> Array:
    """``x`` fake-quantized on the grid of step ``step`` (a scalar) and zero point ``zero``,
    with LSQ's gradients for ``x`` and ``step``; float bits pass ``x`` through."""
    levels = grid.levels(bits)
    per_sample = max(int(x.size // max(x.shape[0], 1)), 1) if x.ndim > 1 else max(x.size, 1)
    factor = jax.lax.rsqrt(jnp.float32(per_sample) * levels)
    lo_hi = step_range(_scaled_gradient(step, factor), jax.lax.stop_gradient(zero), bits)
    scale, z, levels = grid.affine_params(lo_hi[0], lo_hi[1], bits)
    xf = x.astype(jnp.float32)
    q = grid.codes(xf, scale, z, 0.0, levels)
    smooth = jnp.clip(xf / scale + z, 0.0, levels)
    q = smooth + jax.lax.stop_gradient(q - smooth)
    out = grid.dequantize(q, scale, z).astype(x.dtype)
    return jnp.where(grid.is_float(bits), x, out)
