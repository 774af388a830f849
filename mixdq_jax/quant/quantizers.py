"""Fake quantizers (quantize, then dequantize) whose bit-width is traced data.

Every function takes ``bits`` as an array (a Python int works too), so one compiled program
serves every bit-width and ``jax.vmap`` can batch over bit configurations. ``bits >= 16``
means "keep float": the result is the input, selected with ``jnp.where`` (no Python branch).

Fake quantization is literally ``dequantize(codes(x))`` on the one grid of
`pallas_kernels.grid` (scale, zero point, codes, dequantization), the same functions the
weight packer and the activation-quantization kernel use. Weights use one range per output
channel (the last axis of a Flax kernel: Dense ``(in, out)``, Conv ``HWIO``); activations one
range per tensor from calibration. Quantization math runs in float32 and the result is cast
back to ``x.dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import grid
from pallas_kernels.grid import FLOAT_BITS, FP8_MAX

__all__ = [
    "FLOAT_BITS",
    "FP8_MAX",
    "fake_quant",
    "fake_quant_fp8",
    "fake_quant_symmetric",
    "quantize_activation",
    "quantize_weight",
    "weight_range",
]

Array = jax.Array


def fake_quant(x: Array, bits: Array, lo: Array, hi: Array) -> Array:
    """Asymmetric min-max fake quant of ``x`` on the range ``[lo, hi]`` (broadcastable).

    Values outside the range are clipped to it. ``lo``/``hi`` are widened to contain 0.
    """
    scale, zero, levels = grid.affine_params(lo, hi, bits)
    q = grid.codes(x, scale, zero, 0.0, levels)
    deq = grid.dequantize(q, scale, zero).astype(x.dtype)
    return jnp.where(grid.is_float(bits), x, deq)


def fake_quant_symmetric(x: Array, bits: Array, absmax: Array) -> Array:
    """Symmetric fake quant (zero point 0), the official ``sym: True`` weight quantizer.

    ``s = absmax / (2**(b-1) - 1)``, ``q = clip(round(x / s), -2**(b-1), 2**(b-1) - 1)``.
    """
    scale, half = grid.symmetric_params(absmax, bits)
    q = grid.codes(x, scale, None, -half - 1.0, half)
    deq = grid.dequantize(q, scale).astype(x.dtype)
    return jnp.where(grid.is_float(bits), x, deq)


def fake_quant_fp8(x: Array, bits: Array, absmax: Array) -> Array:
    """FP8 e4m3 (``float8_e4m3fn``) fake quant with a scale mapping ``absmax`` to 448.

    The paper's non-uniform baseline for text embeddings (sec. 5.2). ``bits`` only selects
    pass-through (``>= 16``) versus FP8; any value below 16 means FP8.
    """
    scale = grid.fp8_scale(absmax)
    deq = grid.dequantize(grid.fp8_round(x, scale), scale).astype(x.dtype)
    return jnp.where(grid.is_float(bits), x, deq)


weight_range = grid.channel_range


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
        lo, hi = grid.with_zero(lo, hi)
        return fake_quant_fp8(x, bits, jnp.maximum(-lo, hi))
    raise ValueError(f"unknown activation format {fmt!r} (expected 'int' or 'fp8')")
