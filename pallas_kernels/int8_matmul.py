"""W8A8 GEMM: int8 activations x int8 weights -> int32 accumulators -> fused float epilogue.

Operands (see `quantize_act` for the activation code convention):
- ``x_q`` (..., K) int8 activation codes, per-tensor ``a_scale`` and zero point ``a_zp`` (an
  integer in the int8 code range), ``x ~= a_scale * (x_q - a_zp)``.
- ``w_q`` (K, N) int8 weights (Flax kernel layout), symmetric per output channel,
  ``w ~= w_q * w_scale[n]``.

Since ``sum_k (x_q - a_zp) w_q = x_q @ w_q - a_zp * colsum(w_q)``, the kernel runs a plain
int8 x int8 -> int32 dot and folds the zero point into the epilogue with the per-channel column
sums (precompute them once per layer with `weight_column_sums`):

    y = (acc - a_zp * colsum[n]) * (w_scale[n] * a_scale) + bias[n]

``out_dtype=jnp.int32`` returns the zero-point-corrected integer ``acc - a_zp * colsum`` (no
scaling, no bias): it is exact and is what the tests compare bit for bit.

Backends: "pallas" (Triton on GPU; interpret mode elsewhere), "xla" (`lax.dot_general` int8 with
an int32 result, then the same epilogue), "reference" (int32 jnp.matmul), "auto" (pallas on GPU,
xla elsewhere). The GEMM body and the Pallas kernel (tiled by `config.GemmTiles`, K loop inside
the kernel, ragged M/N masked, ragged K zero-padded) are in `gemm`, shared with `w4a8_matmul`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend, resolve_interpret
from pallas_kernels.config import GemmTiles
from pallas_kernels.gemm import check_out_dtype, quantized_gemm
from pallas_kernels.tuning import gemm_tiles


def weight_column_sums(w_q: jax.Array) -> jax.Array:
    """Per-output-channel sums over K of (K, N) int weight codes, as int32."""
    return jnp.sum(w_q.astype(jnp.int32), axis=0)


def int8_matmul_reference(
    x_q, w_q, *, a_scale=1.0, a_zero_point=0, w_scale=None, bias=None, out_dtype=jnp.float32
):
    """Plain definition: int32 matmul of the codes, zero point subtracted, then scaled."""
    out_dtype = check_out_dtype(out_dtype)
    corrected = jnp.matmul(
        x_q.astype(jnp.int32) - jnp.asarray(a_zero_point, jnp.int32), w_q.astype(jnp.int32)
    )
    if out_dtype == jnp.int32:
        return corrected
    scale = jnp.asarray(w_scale, jnp.float32) * jnp.asarray(a_scale, jnp.float32)
    b = 0.0 if bias is None else jnp.asarray(bias, jnp.float32)
    return (corrected.astype(jnp.float32) * scale + b).astype(out_dtype)


def int8_matmul(
    x_q: jax.Array,
    w_q: jax.Array,
    *,
    a_scale: jax.Array | float = 1.0,
    a_zero_point: jax.Array | int = 0,
    w_scale: jax.Array | None = None,
    colsum: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype=jnp.float32,
    backend: str = "auto",
    tiles: GemmTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """``y = (x_q @ w_q - a_zp * colsum) * (w_scale * a_scale) + bias``; shape (..., N).

    `colsum` defaults to `weight_column_sums(w_q)` (pass it precomputed to save a weight pass).
    `tiles` sets the Pallas kernel's Triton tiles (`GemmTiles`; None = its defaults, block_m
    min(128, next_pow2(M)), or on a GPU the tuned tiles of `tuning` when present); they do not
    change the result.
    """
    backend = resolve_backend(backend)
    interpret = resolve_interpret(interpret)
    if w_q.dtype != jnp.int8 or w_q.ndim != 2:
        raise TypeError(f"w_q must be a 2-D int8 (K, N) array, got {w_q.dtype}{w_q.shape}")
    k, n = w_q.shape
    m = math.prod(x_q.shape[:-1])
    tiles = gemm_tiles(tiles, m, k, n, wbits=8, backend=backend, interpret=interpret)
    if backend == "reference":
        return int8_matmul_reference(
            x_q, w_q, a_scale=a_scale, a_zero_point=a_zero_point, w_scale=w_scale, bias=bias,
            out_dtype=out_dtype,
        )
    colsum = weight_column_sums(w_q) if colsum is None else colsum
    return quantized_gemm(
        x_q, w_q, wbits=8, k=k, n=n, colsum=colsum, a_scale=a_scale, a_zero_point=a_zero_point,
        w_scale=w_scale, bias=bias, out_dtype=out_dtype, backend=backend, tiles=tiles,
        interpret=interpret,
    )
