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
xla elsewhere). The Pallas kernel tiles M and N over the grid and loops over K inside the
kernel (a grid axis over K would accumulate correctly only where grid steps run in order).
Ragged M and N are masked in the kernel; a K that is not a multiple of ``block_k`` is
zero-padded in the wrapper (zero weights rows add nothing; SDXL layers rarely need it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._backend import check_block, resolve_backend, resolve_interpret
from pallas_kernels.packing import unpack_field, unpack_weights

_FLOAT_OUT = (jnp.float32, jnp.bfloat16, jnp.float16)


def weight_column_sums(w_q: jax.Array) -> jax.Array:
    """Per-output-channel sums over K of (K, N) int weight codes, as int32."""
    return jnp.sum(w_q.astype(jnp.int32), axis=0)


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _default_block_m(m: int) -> int:
    return min(128, max(16, pl.next_power_of_2(m)))


def _epilogue_vectors(n, *, a_scale, a_zero_point, w_scale, colsum, bias, out_dtype):
    """(zp * colsum, combined scale, bias) as int32 / f32 vectors of length N."""
    zc = jnp.asarray(a_zero_point, jnp.int32) * colsum.astype(jnp.int32)
    if out_dtype == jnp.int32:
        return zc, None, None
    if w_scale is None:
        raise ValueError("a float out_dtype needs w_scale")
    scale = jnp.broadcast_to(
        jnp.asarray(w_scale, jnp.float32) * jnp.asarray(a_scale, jnp.float32), (n,)
    )
    b = jnp.zeros((n,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    return zc, scale, jnp.broadcast_to(b, (n,))


def _apply_epilogue(acc, zc, scale, bias, out_dtype):
    """Shared by every backend and the kernel, so all of them round the same way."""
    corrected = acc - zc
    if out_dtype == jnp.int32:
        return corrected
    return (corrected.astype(jnp.float32) * scale + bias).astype(out_dtype)


def _check_out_dtype(out_dtype) -> jnp.dtype:
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype != jnp.int32 and out_dtype not in [jnp.dtype(d) for d in _FLOAT_OUT]:
        raise ValueError(f"out_dtype must be int32, float32, bfloat16 or float16, got {out_dtype}")
    return out_dtype


def _gemm_kernel(x_ref, w_ref, zc_ref, *refs, m, n, bm, bn, bk, n_k, seg, wbits, out_dtype):
    """One (bm, bn) output tile; loops over K; `wbits` < 8 unpacks segment-packed weights."""
    if out_dtype == jnp.int32:
        (o_ref,) = refs
        s_ref = b_ref = None
    else:
        s_ref, b_ref, o_ref = refs
    rows = pl.program_id(0) * bm + jnp.arange(bm)
    cols = pl.program_id(1) * bn + jnp.arange(bn)
    row_ok, col_ok = rows < m, cols < n
    fields = 8 // wbits if wbits < 8 else 1

    def body(t, acc):
        k0 = pl.multiple_of(t * bk, bk)
        w = plgpu.load(w_ref.at[pl.ds(k0, bk), :], mask=col_ok[None, :], other=0)
        for s in range(fields):
            xk = pl.multiple_of(s * seg + k0, bk)
            x = plgpu.load(x_ref.at[:, pl.ds(xk, bk)], mask=row_ok[:, None], other=0)
            w_s = w if wbits == 8 else unpack_field(w, wbits, s)
            acc += jnp.dot(x, w_s, preferred_element_type=jnp.int32)
        return acc

    acc = jax.lax.fori_loop(0, n_k, body, jnp.zeros((bm, bn), jnp.int32))
    zc = plgpu.load(zc_ref, mask=col_ok, other=0)[None, :]
    if out_dtype == jnp.int32:
        out = _apply_epilogue(acc, zc, None, None, out_dtype)
    else:
        scale = plgpu.load(s_ref, mask=col_ok, other=0.0)[None, :]
        bias = plgpu.load(b_ref, mask=col_ok, other=0.0)[None, :]
        out = _apply_epilogue(acc, zc, scale, bias, out_dtype)
    plgpu.store(o_ref, out, mask=row_ok[:, None] & col_ok[None, :])


def gemm_pallas(
    x2, w, zc, scale, bias, *, wbits, out_dtype, block_m, block_n, block_k, num_warps,
    num_stages, interpret,
):
    """Pallas GEMM on 2-D operands. For `wbits` < 8, `w` is segment-packed (see packing)."""
    m, k = x2.shape
    n = w.shape[1]
    fields = 8 // wbits if wbits < 8 else 1
    bm = _default_block_m(m) if block_m is None else block_m
    for name, v in (("block_m", bm), ("block_n", block_n), ("block_k", block_k)):
        check_block(name, v)
    seg = k // fields
    seg_p = _round_up(seg, block_k)
    if seg_p != seg:  # pad each K segment with zeros so the K loop needs no mask
        x2 = jnp.pad(x2.reshape(m, fields, seg), ((0, 0), (0, 0), (0, seg_p - seg)))
        x2 = x2.reshape(m, fields * seg_p)
        w = jnp.pad(w, ((0, seg_p - seg), (0, 0)))
    kp = fields * seg_p
    kernel = functools.partial(
        _gemm_kernel, m=m, n=n, bm=bm, bn=block_n, bk=block_k, n_k=seg_p // block_k,
        seg=seg_p, wbits=wbits, out_dtype=out_dtype,
    )
    vec_spec = pl.BlockSpec((block_n,), lambda i, j: (j,))
    operands = [x2, w, zc] + ([] if out_dtype == jnp.int32 else [scale, bias])
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, block_n)),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((seg_p, block_n), lambda i, j: (0, j)),
        ] + [vec_spec] * (len(operands) - 2),
        out_specs=pl.BlockSpec((bm, block_n), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"w{wbits}a8_gemm",
    )(*operands)


def _prepare(x_q, w_q_k, n, *, a_scale, a_zero_point, w_scale, colsum, bias, out_dtype):
    if x_q.dtype != jnp.int8:
        raise TypeError(f"x_q must be int8, got {x_q.dtype}")
    if x_q.shape[-1] != w_q_k:
        raise ValueError(f"K mismatch: x_q {x_q.shape} vs weights with K={w_q_k}")
    out_dtype = _check_out_dtype(out_dtype)
    vecs = _epilogue_vectors(
        n, a_scale=a_scale, a_zero_point=a_zero_point, w_scale=w_scale, colsum=colsum,
        bias=bias, out_dtype=out_dtype,
    )
    return x_q.reshape(-1, w_q_k), out_dtype, vecs


def int8_matmul_reference(
    x_q, w_q, *, a_scale=1.0, a_zero_point=0, w_scale=None, bias=None, out_dtype=jnp.float32
):
    """Plain definition: int32 matmul of the codes, zero point subtracted, then scaled."""
    out_dtype = _check_out_dtype(out_dtype)
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
    block_m: int | None = None,
    block_n: int = 128,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool | None = None,
) -> jax.Array:
    """``y = (x_q @ w_q - a_zp * colsum) * (w_scale * a_scale) + bias``; shape (..., N).

    `colsum` defaults to `weight_column_sums(w_q)` (pass it precomputed to save a weight pass).
    Block sizes are Triton tile sizes (powers of two >= 16; block_m defaults to
    min(128, next_pow2(M))); they are not tuned on a GPU here.
    """
    backend = resolve_backend(backend)
    if w_q.dtype != jnp.int8 or w_q.ndim != 2:
        raise TypeError(f"w_q must be a 2-D int8 (K, N) array, got {w_q.dtype}{w_q.shape}")
    k, n = w_q.shape
    if backend == "reference":
        return int8_matmul_reference(
            x_q, w_q, a_scale=a_scale, a_zero_point=a_zero_point, w_scale=w_scale, bias=bias,
            out_dtype=out_dtype,
        )
    colsum = weight_column_sums(w_q) if colsum is None else colsum
    return _gemm(
        x_q, w_q, wbits=8, k=k, n=n, colsum=colsum, a_scale=a_scale, a_zero_point=a_zero_point,
        w_scale=w_scale, bias=bias, out_dtype=out_dtype, backend=backend,
        tiles=dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                   num_stages=num_stages, interpret=resolve_interpret(interpret)),
    )  # fmt: skip


def _gemm(x_q, w, *, wbits, k, n, colsum, a_scale, a_zero_point, w_scale, bias, out_dtype,
          backend, tiles):  # fmt: skip
    """The shared body of `int8_matmul` and `w4a8_matmul` once the weights are validated:
    epilogue vectors, then XLA's int8 dot (weights unpacked first) or the Pallas kernel."""
    x2, out_dtype, (zc, scale, b) = _prepare(
        x_q, k, n, a_scale=a_scale, a_zero_point=a_zero_point, w_scale=w_scale, colsum=colsum,
        bias=bias, out_dtype=out_dtype,
    )  # fmt: skip
    if backend == "xla":
        w_full = w if wbits == 8 else unpack_weights(w, wbits)
        acc = jax.lax.dot_general(
            x2, w_full, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
        y = _apply_epilogue(acc, zc[None, :], *(
            (None, None) if scale is None else (scale[None, :], b[None, :])), out_dtype)
    else:
        y = gemm_pallas(x2, w, zc, scale, b, wbits=wbits, out_dtype=out_dtype, **tiles)
    return y.reshape(*x_q.shape[:-1], n)
