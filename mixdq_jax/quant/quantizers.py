"""Fake quantizers (quantize, then dequantize) whose bit-width is traced data.

Every function takes ``bits`` as an array (a Python int works too), so one compiled program
serves every bit-width and ``jax.vmap`` can batch over bit configurations. ``bits >= 16``
means "keep float": the result is the input, selected with ``jnp.where`` (no Python branch).

Scheme (MixDQ sec. 4.1, the official quantizer): uniform affine min-max quantization,
``q = clip(round(x / s) + z, 0, 2**b - 1)``, ``x_hat = (q - z) * s``, with
``s = (hi - lo) * (1 / (2**b - 1))`` and ``z = round(-lo / s)``; ``round`` is half to even
(``torch.round`` / ``np.round``). Ranges always contain 0, so 0 is exact. Weights use one range
per output channel (the last axis of a Flax kernel: Dense ``(in, out)``, Conv ``HWIO``);
activations one range per tensor from calibration.

The scale is written ``(hi - lo) * (1 / levels)`` on purpose: the division form let XLA fold
the division differently for constant and traced ``levels`` and gave 1-ulp differences
under vmap. Quantization math runs in float32 and the result is cast back to ``x.dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes

FLOAT_BITS = 16
"""Bit-width meaning "not quantized"; any value >= this passes the input through."""

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448.0
# A zero range (all-zero channel, dead activation) would give s = 0 and 0/0; a tiny floor keeps
# the grid finite and still covers the range.
_MIN_SCALE = 1e-8

Array = jax.Array


def _levels(bits: Array) -> tuple[Array, Array]:
    """``(2**b - 1, passthrough)`` from integer-valued (int or float) bits, exactly."""
    bits = jnp.asarray(bits)
    passthrough = bits >= FLOAT_BITS
    b = jnp.clip(jnp.round(bits).astype(jnp.int32), 1, FLOAT_BITS)
    levels = (jnp.left_shift(jnp.int32(1), b) - 1).astype(jnp.float32)
    return levels, passthrough


def _with_zero(lo: Array, hi: Array) -> tuple[Array, Array]:
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    return lo, hi


def fake_quant(x: Array, bits: Array, lo: Array, hi: Array) -> Array:
    """Asymmetric min-max fake quant of ``x`` on the range ``[lo, hi]`` (broadcastable).

    Values outside the range are clipped to it. ``lo``/``hi`` are widened to contain 0.
    """
    levels, passthrough = _levels(bits)
    lo, hi = _with_zero(lo, hi)
    xf = x.astype(jnp.float32)
    scale = jnp.maximum((hi - lo) * (1.0 / levels), _MIN_SCALE)
    zero = jnp.round(-lo / scale)
    q = jnp.clip(jnp.round(xf / scale) + zero, 0.0, levels)
    deq = ((q - zero) * scale).astype(x.dtype)
    return jnp.where(passthrough, x, deq)


def fake_quant_symmetric(x: Array, bits: Array, absmax: Array) -> Array:
    """Symmetric fake quant (zero point 0), the official ``sym: True`` weight quantizer.

    ``s = absmax / (2**(b-1) - 1)``, ``q = clip(round(x / s), -2**(b-1), 2**(b-1) - 1)``.
    """
    _, passthrough = _levels(bits)
    half_levels, _ = _levels(jnp.asarray(bits) - 1)  # 2**(b-1) - 1
    xf = x.astype(jnp.float32)
    absmax = jnp.asarray(absmax, jnp.float32)
    scale = jnp.maximum(absmax * (1.0 / half_levels), _MIN_SCALE)
    q = jnp.clip(jnp.round(xf / scale), -half_levels - 1.0, half_levels)
    deq = (q * scale).astype(x.dtype)
    return jnp.where(passthrough, x, deq)


def fake_quant_fp8(x: Array, bits: Array, absmax: Array) -> Array:
    """FP8 e4m3 (``float8_e4m3fn``) fake quant with a scale mapping ``absmax`` to 448.

    The paper's non-uniform baseline for text embeddings (sec. 5.2). ``bits`` only selects
    pass-through (``>= 16``) versus FP8; any value below 16 means FP8.
    """
    _, passthrough = _levels(bits)
    xf = x.astype(jnp.float32)
    absmax = jnp.asarray(absmax, jnp.float32)
    scale = jnp.maximum(absmax * (1.0 / FP8_MAX), _MIN_SCALE)
    y = jnp.clip(xf / scale, -FP8_MAX, FP8_MAX)
    y = y.astype(jnp.float8_e4m3fn).astype(jnp.float32)
    deq = (y * scale).astype(x.dtype)
    return jnp.where(passthrough, x, deq)


def weight_range(w: Array) -> tuple[Array, Array]:
    """Per-output-channel ``(lo, hi)`` of a Flax kernel, over all axes but the last, with 0."""
    axes = tuple(range(w.ndim - 1))
    wf = w.astype(jnp.float32)
    return _with_zero(jnp.min(wf, axis=axes), jnp.max(wf, axis=axes))


def quantize_weight(w: Array, bits: Array, *, fmt: str = "int") -> Array:
    """Fake-quantize a Flax kernel per output channel.

    ``fmt``: ``"int"`` (asymmetric, the paper), ``"int_sym"`` (the official run config's
    ``sym: True``) or ``"fp8"`` (e4m3 with a per-channel scale).
    """
    lo, hi = weight_range(w)
    if fmt == "int":
        return fake_quant(w, bits, lo, hi)
    absmax = jnp.maximum(-lo, hi)
    if fmt == "int_sym":
        return fake_quant_symmetric(w, bits, absmax)
    if fmt == "fp8":
        return fake_quant_fp8(w, bits, absmax)
    raise ValueError(f"unknown weight format {fmt!r} (expected 'int', 'int_sym' or 'fp8')")


def quantize_activation(x: Array, bits: Array, lo: Array, hi: Array, *, fmt: str = "int") -> Array:
    """Fake-quantize an activation per tensor with its calibrated range ``[lo, hi]``.

    ``fmt``: ``"int"`` (asymmetric) or ``"fp8"`` (scale from ``max(|lo|, |hi|)``).
    """
    if fmt == "int":
        return fake_quant(x, bits, lo, hi)
    if fmt == "fp8":
        lo, hi = _with_zero(lo, hi)
        return fake_quant_fp8(x, bits, jnp.maximum(-lo, hi))
    raise ValueError(f"unknown activation format {fmt!r} (expected 'int' or 'fp8')")
