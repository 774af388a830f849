"""W4A8 (and W2A8) GEMM: packed int4/int2 weights unpacked inside the kernel, int8 activations.

Weights are stored segment-packed along K (`packing.pack_weights`): (K * bits / 8, N) int8
bytes. Each K step loads one (block_k, block_n) tile of bytes, splits it with two shifts per
field into ``8 // bits`` int8 tiles and runs one int8 x int8 -> int32 dot per field against the
matching activation columns; the epilogue is the one of `int8_matmul` (both run `gemm`). Weight
memory traffic is halved (quartered for int2); the arithmetic stays on int8 tensor cores, as in
the paper, which has no INT4 kernels either (MixDQ appendix C).

`colsum` must be the column sums of the *unpacked* codes (`packed_column_sums`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend, resolve_interpret
from pallas_kernels.config import GemmTiles
from pallas_kernels.gemm import quantized_gemm
from pallas_kernels.int8_matmul import int8_matmul_reference, weight_column_sums
from pallas_kernels.packing import unpack_weights, values_per_byte
from pallas_kernels.tuning import gemm_tiles


def packed_column_sums(w_packed: jax.Array, bits: int = 4) -> jax.Array:
    """Per-output-channel sums of the unpacked weight codes, int32 (N,)."""
    return weight_column_sums(unpack_weights(w_packed, bits))


def w4a8_matmul_reference(
    x_q, w_packed, *, bits=4, a_scale=1.0, a_zero_point=0, w_scale=None, bias=None,
    out_dtype=jnp.float32,
):
    """Unpack with jnp, then the int8 reference."""
    return int8_matmul_reference(
        x_q, unpack_weights(w_packed, bits), a_scale=a_scale, a_zero_point=a_zero_point,
        w_scale=w_scale, bias=bias, out_dtype=out_dtype,
    )


def w4a8_matmul(
    x_q: jax.Array,
    w_packed: jax.Array,
    *,
    bits: int = 4,
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
    """Same contract as `int8_matmul`, with (K * bits / 8, N) packed weights (bits 4 or 2).

    `tiles.block_k` counts packed rows per K step; each step issues ``8 // bits`` dots of depth
    block_k. With ``tiles=None`` on a GPU, the tuned tiles of `tuning` apply when present.
    """
    backend = resolve_backend(backend)
    interpret = resolve_interpret(interpret)
    r = values_per_byte(bits)
    if w_packed.dtype != jnp.int8 or w_packed.ndim != 2:
        raise TypeError(
            f"w_packed must be a 2-D int8 array of packed bytes, got {w_packed.dtype}"
            f"{w_packed.shape}"
        )
    k, n = w_packed.shape[0] * r, w_packed.shape[1]
    m = math.prod(x_q.shape[:-1])
    tiles = gemm_tiles(tiles, m, k, n, wbits=bits, backend=backend, interpret=interpret)
    if backend == "reference":
        return w4a8_matmul_reference(
            x_q, w_packed, bits=bits, a_scale=a_scale, a_zero_point=a_zero_point,
            w_scale=w_scale, bias=bias, out_dtype=out_dtype,
        )
    colsum = packed_column_sums(w_packed, bits) if colsum is None else colsum
    return quantized_gemm(
        x_q, w_packed, wbits=bits, k=k, n=n, colsum=colsum, a_scale=a_scale,
        a_zero_point=a_zero_point, w_scale=w_scale, bias=bias, out_dtype=out_dtype,
        backend=backend, tiles=tiles, interpret=interpret,
    )
