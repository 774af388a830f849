"""Activation quantization: float -> int8 codes with a per-tensor scale and zero point.

Representation (shared with `int8_matmul`): codes live in the signed range of `bits`,
``[qmin, qmax] = [-2**(bits-1), 2**(bits-1) - 1]``, and the zero point ``zp`` is an integer in
that same range. This is the unsigned asymmetric quantizer ``u = clip(round(x/s) + zp_u, 0,
2**bits - 1)`` shifted by ``2**(bits-1)`` (``q = u - 2**(bits-1)``, ``zp = zp_u - 2**(bits-1)``),
so 8-bit codes fit int8 and dequantization is ``x ~= s * (q - zp)``. Codes of fewer bits are
stored in int8 too (clipped to their 2**bits levels).

Arithmetic is the one grid's (`pallas_kernels.grid`, shared with fake quantization; torch's
``round(x / s)``): f32 ``x / s`` rounded half to even, so deployment codes match fake quant
bit for bit. Triton lowers f32 ``/`` to the approximate ``div.full.f32``, so the compiled kernel
divides with inline PTX ``div.rn.f32`` (IEEE, NVIDIA only) and builds round-half-even from
floor (Pallas Triton has no lowering for ``lax.round``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import grid
from pallas_kernels.backend import resolve_backend, resolve_interpret
from pallas_kernels.config import QuantizeTiles, resolve_tiles
from pallas_kernels.grid import code_range


def activation_qparams(lo: jax.Array, hi: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
    """Scale (f32) and zero point (int32, in the signed code range) for the range [lo, hi].

    The range is widened to include 0 so that 0.0 (padding, ReLU zeros) is exact. Same
    formulas as the fake quantizer: ``s = max((hi - lo) * (1 / (2**b - 1)), 1e-8)``,
    ``zp = qmin + round(-lo / s)``.
    """
    qmin, qmax = code_range(bits)
    scale, zero, _ = grid.affine_params(lo, hi, bits)
    zero_point = jnp.clip(qmin + zero, qmin, qmax).astype(jnp.int32)
    return scale, zero_point


def dequantize_activation(q: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
    """``scale * (q - zp)`` in f32."""
    return grid.dequantize(q, jnp.asarray(scale, jnp.float32), zero_point)


def _divide_rn(x: jax.Array, s: jax.Array, *, inline_ptx: bool) -> jax.Array:
    """IEEE f32 division; in compiled Triton via PTX div.rn.f32 (plain / is approximate)."""
    s = jnp.broadcast_to(s, x.shape)
    if not inline_ptx:
        return x / s
    [out] = plgpu.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;", args=[x, s], constraints="=r,r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return out


def _round_half_even(v: jax.Array) -> jax.Array:
    """Round half to even from floor only (Pallas Triton has no lowering for lax.round)."""
    f = jnp.floor(v)
    d = v - f
    f_is_odd = (f - 2.0 * jnp.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & f_is_odd)
    return jnp.where(up, f + 1.0, f)


def quantize_activation_reference(
    x: jax.Array, scale: jax.Array, zero_point: jax.Array, *, bits: int = 8
) -> jax.Array:
    """Plain-jnp definition: ``clip(round(x / s) + zp, qmin, qmax)`` as int8."""
    qmin, qmax = code_range(bits)
    return grid.codes(x, jnp.asarray(scale, jnp.float32), zero_point, qmin, qmax).astype(jnp.int8)


def _quantize_kernel(x_ref, s_ref, zp_ref, o_ref, *, n, block, qmin, qmax, inline_ptx):
    offs = pl.program_id(0) * block + jnp.arange(block)
    mask = offs < n
    x = plgpu.load(x_ref, mask=mask, other=0).astype(jnp.float32)
    v = _divide_rn(x, s_ref[...], inline_ptx=inline_ptx)
    v = _round_half_even(v) + zp_ref[...].astype(jnp.float32)
    q = jnp.minimum(jnp.maximum(v, float(qmin)), float(qmax)).astype(jnp.int32)
    plgpu.store(o_ref, q.astype(jnp.int8), mask=mask)


def _quantize_pallas(x, scale, zero_point, *, bits, tiles: QuantizeTiles, interpret):
    block = tiles.block
    qmin, qmax = code_range(bits)
    flat = x.reshape(-1)
    n = flat.shape[0]
    s = jnp.asarray(scale, jnp.float32).reshape(1)
    zp = jnp.asarray(zero_point, jnp.int32).reshape(1)
    kernel = functools.partial(
        _quantize_kernel, n=n, block=block, qmin=qmin, qmax=qmax, inline_ptx=not interpret
    )
    scalar_spec = pl.BlockSpec((1,), lambda i: (0,))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((n,), jnp.int8),
        grid=(pl.cdiv(n, block),),
        in_specs=[pl.BlockSpec((block,), lambda i: (i,)), scalar_spec, scalar_spec],
        out_specs=pl.BlockSpec((block,), lambda i: (i,)),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps),
        interpret=interpret,
        name="quantize_activation",
    )(flat, s, zp)
    return out.reshape(x.shape)


def quantize_activation(
    x: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    *,
    bits: int = 8,
    backend: str = "auto",
    tiles: QuantizeTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Quantizes `x` (any shape, float) to int8 codes; see the module docstring.

    backend: "pallas" (Triton on GPU, interpret mode elsewhere), "xla" (fused jnp, identical to
    the reference for this elementwise op), "reference", or "auto" (pallas on GPU, else xla).
    `tiles` sets the Pallas kernel's Triton tiles (`QuantizeTiles`; None = its defaults).
    """
    backend = resolve_backend(backend)
    tiles = resolve_tiles(tiles, QuantizeTiles)
    if backend == "pallas":
        return _quantize_pallas(
            x, scale, zero_point, bits=bits, tiles=tiles, interpret=resolve_interpret(interpret)
        )
    return quantize_activation_reference(x, scale, zero_point, bits=bits)
