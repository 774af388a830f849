"""The one quantization grid: scale and zero point, codes, dequantization.

Fake quantization (`mixdq_jax.quant.quantizers`), the weight packer (`mixdq_jax.deploy.packed`)
and the activation-quantization kernel's reference (`quantize_act`) all call these functions,
so the fake and real paths agree because they run the same f32 operations, not because three
copies are kept in step. It lives at the bottom of the stack (the kernels) because the kernels
are the lowest layer that needs it.

Scheme (MixDQ sec. 4.1, the official quantizer): uniform min-max quantization on a range that
contains 0, ``s = max((hi - lo) * (1 / (2**b - 1)), MIN_SCALE)``, ``z = round(-lo / s)``,
``q = clip(round(x / s) + z, qmin, qmax)``, ``x_hat = (q - z) * s``; ``round`` is half to even
(``torch.round`` / ``np.round``). Symmetric: ``s = absmax / (2**(b-1) - 1)``, ``z = 0``. FP8
e4m3: a scale that maps ``absmax`` to 448, then a cast.

``bits`` may be a Python int or a traced array: every formula is written so one compiled
program serves every bit-width. The scale is ``(hi - lo) * (1 / levels)``, not a division by
``levels``: the division form let XLA fold it differently for constant and traced ``levels``
(1-ulp differences under vmap).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes

Array = jax.Array

MIN_SCALE = 1e-8
"""Scale floor: a zero-width range (all-zero channel, dead activation) would give s = 0 and
0 / 0; the floor keeps the grid finite and still covers the range."""

FLOAT_BITS = 16
"""Bit-width meaning "not quantized"; any value >= this passes the input through."""

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448.0


def levels(bits: Array | int) -> Array:
    """``2**b - 1`` as f32 from integer-valued bits (int or float, traced or not), exactly."""
    b = jnp.clip(jnp.round(jnp.asarray(bits)).astype(jnp.int32), 1, FLOAT_BITS)
    return (jnp.left_shift(jnp.int32(1), b) - 1).astype(jnp.float32)


def is_float(bits: Array | int) -> Array:
    """True where ``bits`` means "keep float" (a run-time select under tracing)."""
    return jnp.asarray(bits) >= FLOAT_BITS


def with_zero(lo: Array, hi: Array) -> tuple[Array, Array]:
    """The range widened to contain 0 (so 0, padding and ReLU zeros are exact), in f32."""
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    return lo, hi


def channel_range(w: Array) -> tuple[Array, Array]:
    """Per-output-channel ``(lo, hi)`` of a Flax kernel (last axis), widened to contain 0."""
    axes = tuple(range(w.ndim - 1))
    wf = w.astype(jnp.float32)
    return with_zero(jnp.min(wf, axis=axes), jnp.max(wf, axis=axes))


def affine_params(lo: Array, hi: Array, bits: Array | int) -> tuple[Array, Array, Array]:
    """``(scale, zero, levels)`` of the asymmetric grid on ``[lo, hi]``: codes ``[0, levels]``,
    ``zero`` an integer-valued f32 (the unsigned zero point)."""
    lv = levels(bits)
    lo, hi = with_zero(lo, hi)
    scale = jnp.maximum((hi - lo) * (1.0 / lv), MIN_SCALE)
    return scale, jnp.round(-lo / scale), lv


def symmetric_params(absmax: Array, bits: Array | int) -> tuple[Array, Array]:
    """``(scale, half)`` of the symmetric grid: codes ``[-half - 1, half]``,
    ``half = 2**(b-1) - 1``."""
    half = levels(jnp.asarray(bits) - 1)
    scale = jnp.maximum(jnp.asarray(absmax, jnp.float32) * (1.0 / half), MIN_SCALE)
    return scale, half


def fp8_scale(absmax: Array) -> Array:
    """The FP8 e4m3 scale mapping ``absmax`` to ``FP8_MAX``."""
    return jnp.maximum(jnp.asarray(absmax, jnp.float32) * (1.0 / FP8_MAX), MIN_SCALE)


def codes(
    x: Array, scale: Array, zero: Array | None, qmin: Array | float, qmax: Array | float
) -> Array:
    """``clip(round(x / s) + z, qmin, qmax)`` in f32 (integer-valued); ``zero=None``: no shift."""
    v = jnp.round(x.astype(jnp.float32) / scale)
    if zero is not None:
        v = v + jnp.asarray(zero).astype(jnp.float32)
    return jnp.clip(v, qmin, qmax)


def dequantize(q: Array, scale: Array, zero: Array | None = None) -> Array:
    """``(q - z) * s`` in f32 (``q * s`` without a zero point)."""
    q = q.astype(jnp.float32)
    if zero is not None:
        q = q - jnp.asarray(zero).astype(jnp.float32)
    return q * scale


def fp8_round(x: Array, scale: Array) -> Array:
    """``x / s`` clipped to the FP8 range and rounded to e4m3 (returned as f32)."""
    y = jnp.clip(x.astype(jnp.float32) / scale, -FP8_MAX, FP8_MAX)
    return y.astype(jnp.float8_e4m3fn).astype(jnp.float32)


def signed_shift(bits: int) -> int:
    """``2**(b-1)``: unsigned codes ``[0, 2**b - 1]`` minus this are the signed int8 codes."""
    return 1 << (bits - 1)


def code_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of signed `bits`-bit codes."""
    if not 2 <= bits <= 8:
        raise ValueError(f"activation bits must be in [2, 8], got {bits}")
    return -signed_shift(bits), signed_shift(bits) - 1


# --- groups along the input channels (SVDQuant's format) ---------------------------------
# Symmetric signed codes ``[-2**(b-1), 2**(b-1) - 1]`` with one scale per group of ``group``
# consecutive channels of the last axis, ``s = absmax(group) / (2**(b-1) - 1)``: per token for
# activations (computed at run time: dynamic), per output channel for weights (the kernel's
# input axis moved last). A last axis that ``group`` does not divide is zero-padded: zeros
# change neither a group's absmax nor a dot product.


def grouped(x: Array, group: int) -> Array:
    """``x`` (``[..., C]``) as ``[..., ceil(C / group), group]``, zero-padded."""
    if group < 1:
        raise ValueError(f"group size must be >= 1, got {group}")
    c = x.shape[-1]
    pad = -c % group
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], (c + pad) // group, group)


def ungrouped(xg: Array, channels: int) -> Array:
    """Inverse of :func:`grouped`: ``[..., G, group]`` back to ``[..., channels]``."""
    return xg.reshape(*xg.shape[:-2], -1)[..., :channels]


def group_params(xg: Array, bits: Array | int) -> tuple[Array, Array]:
    """``(scale [..., G, 1], half)`` of the symmetric grid of every group of ``xg``."""
    absmax = jnp.max(jnp.abs(xg.astype(jnp.float32)), axis=-1, keepdims=True)
    return symmetric_params(absmax, bits)


def group_codes(x: Array, bits: Array | int, group: int) -> tuple[Array, Array]:
    """``(codes [..., G, group] f32 integer-valued, scale [..., G, 1])`` of ``x``'s last axis
    in groups of ``group`` (zero-padded)."""
    xg = grouped(x.astype(jnp.float32), group)
    scale, half = group_params(xg, bits)
    return codes(xg, scale, None, -half - 1.0, half), scale


def group_fake_quant(x: Array, bits: Array | int, group: int) -> Array:
    """Quantize-dequantize ``x``'s last axis in groups (``bits >= 16``: ``x`` unchanged)."""
    q, scale = group_codes(x, bits, group)
    deq = ungrouped(dequantize(q, scale), x.shape[-1]).astype(x.dtype)
    return jnp.where(is_float(bits), x, deq)


def group_fake_quant_kernel(kernel: Array, bits: Array | int, group: int) -> Array:
    """A Flax kernel (``(in, out)`` or HWIO) fake-quantized per output channel in groups of
    ``group`` input channels (per kernel position for a conv)."""
    moved = jnp.moveaxis(kernel, -2, -1)  # [..., out, in]
    return jnp.moveaxis(group_fake_quant(moved, bits, group), -1, -2)
