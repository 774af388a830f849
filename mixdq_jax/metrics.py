"""Image and tensor error metrics used for sensitivity analysis and evaluation.

All functions are pure jnp and reduce over the trailing axes, so they vmap and batch.
Images are ``(..., H, W, C)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def ssim_global(
    x: Array, y: Array, *, data_range: float = 255.0, sample_covariance: bool = True
) -> Array:
    """SSIM with the whole image as one window (MixDQ sec. 3.2), averaged over channels.

    Per channel: one mean, variance and covariance over all H*W pixels,
    ``((2 mx my + C1)(2 sxy + C2)) / ((mx^2 + my^2 + C1)(sx^2 + sy^2 + C2))`` with
    ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``. ``sample_covariance=True`` divides (co)variances
    by ``N - 1`` like skimage's default (the official code used skimage); it then equals
    ``skimage.metrics.structural_similarity(x, y, win_size=H, channel_axis=-1,
    data_range=L)`` on odd square images. Returns shape ``x.shape[:-3]``.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.shape != y.shape or x.ndim < 3:
        raise ValueError(f"ssim_global: need equal (..., H, W, C) shapes, got {x.shape}, {y.shape}")
    n = x.shape[-3] * x.shape[-2]
    norm = 1.0 / (n - 1) if sample_covariance else 1.0 / n
    axes = (-3, -2)
    mx = jnp.mean(x, axis=axes, keepdims=True)
    my = jnp.mean(y, axis=axes, keepdims=True)
    dx, dy = x - mx, y - my
    vx = jnp.sum(dx * dx, axis=axes) * norm
    vy = jnp.sum(dy * dy, axis=axes) * norm
    cxy = jnp.sum(dx * dy, axis=axes) * norm
    mx, my = mx[..., 0, 0, :], my[..., 0, 0, :]
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=-1)


def mse(x: Array, y: Array, *, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean squared error over ``axis`` (all axes by default)."""
    d = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
    return jnp.mean(d * d, axis=axis)


def psnr(x: Array, y: Array, *, data_range: float = 255.0, axis=None) -> Array:
    """Peak signal-to-noise ratio in dB: ``10 log10(L^2 / MSE)``."""
    return 10.0 * jnp.log10(data_range**2 / mse(x, y, axis=axis))


def sqnr_db(reference: Array, test: Array, *, axis: int | tuple[int, ...] | None = None) -> Array:
    """Signal-to-quantization-noise ratio in dB, ``10 log10(sum ref^2 / sum (test - ref)^2)``.

    Sums over ``axis`` (all by default), as the official sensitivity code does per batch.
    """
    ref = jnp.asarray(reference, jnp.float32)
    err = jnp.asarray(test, jnp.float32) - ref
    return 10.0 * jnp.log10(jnp.sum(ref * ref, axis=axis) / jnp.sum(err * err, axis=axis))
