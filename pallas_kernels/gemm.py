"""The quantized GEMM shared by `int8_matmul`, `w4a8_matmul` and `int8_conv2d`.

One body for every weight width: validate and flatten the int8 activation codes, build the
epilogue vectors, then either XLA's int8 ``dot_general`` (packed weights unpacked first) or the
Pallas kernel, and the same fused epilogue

    y = (acc - a_zp * colsum[n]) * (w_scale[n] * a_scale) + bias[n]

(``out_dtype=jnp.int32``: the zero-point-corrected ``acc - a_zp * colsum`` only). See
`int8_matmul` for the operand conventions.

The Pallas kernel tiles M and N over the grid (`GemmTiles.block_m` / ``block_n``) and loops
over K inside the kernel (a grid axis over K would accumulate correctly only where grid steps
run in order). Ragged M and N are masked in the kernel; a K that is not a multiple of
``block_k`` is zero-padded in the wrapper (zero weight rows add nothing; SDXL layers rarely need
it). For ``wbits`` < 8 the weights are segment-packed (`packing`): each K step loads one tile
of bytes, unpacks ``8 // wbits`` int8 fields with shifts and issues one int8 dot per field.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.config import GemmTiles
from pallas_kernels.packing import unpack_field, unpack_weights

FLOAT_OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def check_out_dtype(out_dtype) -> jnp.dtype:
    """`out_dtype` as a dtype: int32 (exact corrected accumulator) or a float in FLOAT_OUT."""
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype != jnp.int32 and out_dtype not in [jnp.dtype(d) for d in FLOAT_OUT_DTYPES]:
        raise ValueError(f"out_dtype must be int32, float32, bfloat16 or float16, got {out_dtype}")
    return out_dtype


def epilogue_vectors(n, *, a_scale, a_zero_point, w_scale, colsum, bias, out_dtype):
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


def apply_epilogue(acc, zc, scale, bias, out_dtype):
    """Shared by every backend and the kernel, so all of them round the same way."""
    corrected = acc - zc
    if out_dtype == jnp.int32:
        return corrected
    return (corrected.astype(jnp.float32) * scale + bias).astype(out_dtype)


def prepare_gemm(x_q, k, n, *, a_scale, a_zero_point, w_scale, colsum, bias, out_dtype):
    """Checks the int8 codes against K and `out_dtype`; returns (x_q as (M, K), out_dtype,
    (zp * colsum, scale, bias))."""
    if x_q.dtype != jnp.int8:
        raise TypeError(f"x_q must be int8, got {x_q.dtype}")
    if x_q.shape[-1] != k:
        raise ValueError(f"K mismatch: x_q {x_q.shape} vs weights with K={k}")
    out_dtype = check_out_dtype(out_dtype)
    vecs = epilogue_vectors(
        n, a_scale=a_scale, a_zero_point=a_zero_point, w_scale=w_scale, colsum=colsum,
        bias=bias, out_dtype=out_dtype,
    )
    return x_q.reshape(-1, k), out_dtype, vecs


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


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
        out = apply_epilogue(acc, zc, None, None, out_dtype)
    else:
        scale = plgpu.load(s_ref, mask=col_ok, other=0.0)[None, :]
        bias = plgpu.load(b_ref, mask=col_ok, other=0.0)[None, :]
        out = apply_epilogue(acc, zc, scale, bias, out_dtype)
    plgpu.store(o_ref, out, mask=row_ok[:, None] & col_ok[None, :])


def gemm_pallas(x2, w, zc, scale, bias, *, wbits, out_dtype, tiles: GemmTiles, interpret: bool):
    """Pallas GEMM on 2-D operands. For `wbits` < 8, `w` is segment-packed (see packing)."""
    m, k = x2.shape
    n = w.shape[1]
    fields = 8 // wbits if wbits < 8 else 1
    bm, bn, bk = tiles.block_m_for(m), tiles.block_n, tiles.block_k
    seg = k // fields
    seg_p = _round_up(seg, bk)
    if seg_p != seg:  # pad each K segment with zeros so the K loop needs no mask
        x2 = jnp.pad(x2.reshape(m, fields, seg), ((0, 0), (0, 0), (0, seg_p - seg)))
        x2 = x2.reshape(m, fields * seg_p)
        w = jnp.pad(w, ((0, seg_p - seg), (0, 0)))
    kp = fields * seg_p
    kernel = functools.partial(
        _gemm_kernel, m=m, n=n, bm=bm, bn=bn, bk=bk, n_k=seg_p // bk, seg=seg_p, wbits=wbits,
        out_dtype=out_dtype,
    )
    vec_spec = pl.BlockSpec((bn,), lambda i, j: (j,))
    operands = [x2, w, zc] + ([] if out_dtype == jnp.int32 else [scale, bias])
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
        in_specs=[
            pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((seg_p, bn), lambda i, j: (0, j)),
        ] + [vec_spec] * (len(operands) - 2),
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages
        ),
        interpret=interpret,
        name=f"w{wbits}a8_gemm",
    )(*operands)


def quantized_gemm(
    x_q, w, *, wbits, k, n, colsum, a_scale, a_zero_point, w_scale, bias, out_dtype, backend,
    tiles: GemmTiles, interpret: bool,
):
    """The body of `int8_matmul` and `w4a8_matmul` once the weights are validated and the
    backend resolved ("xla" or "pallas"): epilogue vectors, then XLA's int8 dot (weights
    unpacked first) or the Pallas kernel. Returns shape (..., N)."""
    x2, out_dtype, (zc, scale, b) = prepare_gemm(
        x_q, k, n, a_scale=a_scale, a_zero_point=a_zero_point, w_scale=w_scale, colsum=colsum,
        bias=bias, out_dtype=out_dtype,
    )
    if backend == "xla":
        w_full = w if wbits == 8 else unpack_weights(w, wbits)
        acc = jax.lax.dot_general(
            x2, w_full, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
        vecs = (None, None) if scale is None else (scale[None, :], b[None, :])
        y = apply_epilogue(acc, zc[None, :], *vecs, out_dtype)
    else:
        y = gemm_pallas(
            x2, w, zc, scale, b, wbits=wbits, out_dtype=out_dtype, tiles=tiles,
            interpret=interpret,
        )
    return y.reshape(*x_q.shape[:-1], n)
