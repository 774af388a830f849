"""W4A4 GEMM with group scales and a low-rank epilogue (SVDQuant's format), on int8 tensor cores.

Contract (``G = K // group`` groups of ``group`` consecutive input channels)::

    y[m, n] = sum_g x_scale[m, g] * w_scale[g, n] * sum_{k in group g} x_q[m, k] * w[k, n]
              + (lr_x @ lr_up)[m, n]          # optional low-rank branch
              + bias[n]                        # optional

- ``x_q`` (..., K) int8 activation codes in [-8, 7] (4-bit signed, one per byte: what
  `grid.group_codes(x, 4, group)` gives, reshaped to (..., K)); ``x_scale`` (..., G) or (M, G),
  one scale per token per group (dynamic).
- ``w_packed`` (K // 2, N) int8: signed int4 codes group-segment packed
  (`packing.pack_group_weights`); ``w_scale`` (G, N), per group per output channel.
- ``lr_x`` (..., r) or (M, r) and ``lr_up`` (r, N): the low-rank branch that absorbs the
  outliers (SVDQuant), ``lr_x = (x / smooth) @ L1`` computed by the caller. ``lr_up.dtype``
  (float16 / bfloat16 / float32) sets the branch's precision: ``lr_x`` is cast to it, products
  accumulate in f32 (f32 factors multiply at full IEEE precision, no TF32).
- ``bias`` (N,); ``out_dtype`` float32 (default), bfloat16 or float16.

K must be a multiple of ``group`` (zero-pad K: zero codes add nothing) and ``group`` even.

Why this shape of kernel: Hopper has no int4 tensor-core MMA (MixDQ appendix C makes the same
point for W4A8), so each group's partial product runs as int8 x int8 -> int32 dots on the
unpacked 4-bit storage, exactly as in `w4a8_matmul`; but with a scale per (token, group) and per
(group, channel) the int32 sums can no longer be scaled once at the end: every group's int32
partial product is converted to f32, scaled by ``w_scale[g, :]`` and then ``x_scale[:, g]``
(a multiply and a fused multiply-add per element) and accumulated in f32, in group order.
Group-segment packing makes a K tile of ``group // 2`` packed rows exactly one group: its low
nibbles are the group's first half of rows, its high nibbles the second half, so one loaded
byte tile feeds two plain dots against two contiguous activation tiles, with no shuffle. The
low-rank product (one small 16-bit dot) and the bias are added in the epilogue, so the branch
costs no extra pass over the output.

Backends (`backend.resolve_backend`): "pallas" (Triton on GPU, interpret mode elsewhere; tiles
from `config.GemmTiles`, K loop inside the kernel because accumulating across grid steps is
only correct where they run in order; ragged M and N masked), "xla" (unpacked weights, one
batched int8 ``dot_general`` over the groups with int32 results, then the scaled sum over
groups: it materializes G x M x N int32, a fallback, not a fast path), "reference" (plain jnp,
one int32 matmul per group), "auto" (pallas on GPU, xla elsewhere). The three agree to f32
rounding (the order of the f32 sums differs), not bit for bit.

The Pallas kernel needs ``group // 2`` to be a power of two >= 16 (group 32, 64, 128, ...: a
Triton dot is at least 16 deep); the other backends take any even group.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.backend import resolve_backend, resolve_interpret
from pallas_kernels.config import MIN_BLOCK, GemmTiles, resolve_tiles
from pallas_kernels.packing import unpack_field, unpack_group_weights

DEFAULT_GROUP = 64
"""SVDQuant's group size along K."""

OUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
LOW_RANK_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Operands:
    """Validated operands, flattened to 2-D: x2 (M, K) int8, xs (M, G) f32, w (K // 2, N) int8,
    ws (G, N) f32, lx (M, r) and lu (r, N) in the branch dtype (or None), bias (N,) f32 or None."""

    x2: jax.Array
    xs: jax.Array
    w: jax.Array
    ws: jax.Array
    lx: jax.Array | None
    lu: jax.Array | None
    bias: jax.Array | None
    out_dtype: jnp.dtype
    lead: tuple[int, ...]
    group: int

    @property
    def mkn(self) -> tuple[int, int, int]:
        return self.x2.shape[0], self.x2.shape[1], self.w.shape[1]


def _rows(arr: jax.Array, lead: tuple[int, ...], m: int, last: int, name: str,
          what: str) -> jax.Array:
    """`arr` of shape (*lead, last) or (M, last) as (M, last)."""
    if arr.shape not in ((*lead, last), (m, last)):
        raise ValueError(
            f"{name} must have shape {(*lead, last)} or {(m, last)} ({what}), got {arr.shape}"
        )
    return arr.reshape(m, last)


def _prepare(x_q, w_packed, x_scale, w_scale, group, lr_x, lr_up, bias, out_dtype) -> _Operands:
    """Checks every operand against (M, K, N, G, r); clear errors naming the argument."""
    x_q = jnp.asarray(x_q)
    w_packed = jnp.asarray(w_packed)
    if x_q.dtype != jnp.int8 or x_q.ndim < 1:
        raise TypeError(f"x_q must be int8 codes (..., K), got {x_q.dtype}{x_q.shape}")
    if w_packed.dtype != jnp.int8 or w_packed.ndim != 2:
        raise TypeError(
            f"w_packed must be a 2-D int8 (K // 2, N) array of packed bytes, got "
            f"{w_packed.dtype}{w_packed.shape}"
        )
    if not isinstance(group, int) or isinstance(group, bool) or group < 2 or group % 2:
        raise ValueError(f"group must be an even int >= 2, got {group!r}")
    k, n = 2 * w_packed.shape[0], w_packed.shape[1]
    if x_q.shape[-1] != k:
        raise ValueError(
            f"K mismatch: x_q {x_q.shape} vs w_packed {w_packed.shape} (K = 2 x {w_packed.shape[0]}"
            f" = {k})"
        )
    if k % group:
        raise ValueError(f"K = {k} must be a multiple of group={group} (zero-pad K)")
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in [jnp.dtype(d) for d in OUT_DTYPES]:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    g = k // group
    lead = tuple(x_q.shape[:-1])
    m = math.prod(lead)
    xs = _rows(jnp.asarray(x_scale, jnp.float32), lead, m, g, "x_scale",
               f"one scale per token per group of {group}")
    ws = jnp.asarray(w_scale, jnp.float32)
    if ws.shape != (g, n):
        raise ValueError(
            f"w_scale must have shape (K // group, N) = {(g, n)}, got {ws.shape}"
        )
    lx = lu = None
    if (lr_x is None) != (lr_up is None):
        raise ValueError("lr_x and lr_up must be given together (the low-rank branch) or not")
    if lr_up is not None:
        lu, lx = jnp.asarray(lr_up), jnp.asarray(lr_x)
        if lu.dtype not in [jnp.dtype(d) for d in LOW_RANK_DTYPES] or lu.ndim != 2:
            raise TypeError(
                f"lr_up must be a 2-D float16, bfloat16 or float32 (r, N) array, got "
                f"{lu.dtype}{lu.shape}"
            )
        if not jnp.issubdtype(lx.dtype, jnp.floating):
            raise TypeError(f"lr_x must be a float array, got {lx.dtype}")
        r = lu.shape[0]
        if lu.shape[1] != n:
            raise ValueError(f"lr_up must have shape (r, N) = (r, {n}), got {lu.shape}")
        lx = _rows(lx, lead, m, r, "lr_x", f"rank r = {r} of lr_up").astype(lu.dtype)
    b = None
    if bias is not None:
        b = jnp.asarray(bias, jnp.float32)
        if b.shape != (n,):
            raise ValueError(f"bias must have shape (N,) = ({n},), got {b.shape}")
    return _Operands(x_q.reshape(m, k), xs, w_packed, ws, lx, lu, b, out_dtype, lead, group)


def _branch_precision(dtype) -> jax.lax.Precision:
    """f32 factors at full precision (Triton and XLA's GPU dots default to TF32)."""
    return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT


def _epilogue(acc: jax.Array, ops: _Operands) -> jax.Array:
    """f32 group sum + low-rank product + bias, then the output cast (XLA backends)."""
    if ops.lu is not None:
        acc = acc + jnp.matmul(ops.lx, ops.lu, preferred_element_type=jnp.float32,
                               precision=_branch_precision(ops.lu.dtype))
    if ops.bias is not None:
        acc = acc + ops.bias[None, :]
    return acc.astype(ops.out_dtype)


def _finish(y: jax.Array, ops: _Operands) -> jax.Array:
    return y.reshape(*ops.lead, ops.w.shape[1])


def _reference_2d(ops: _Operands) -> jax.Array:
    m, _, n = ops.mkn
    grp = ops.group
    w = unpack_group_weights(ops.w, grp).astype(jnp.int32)
    x = ops.x2.astype(jnp.int32)
    acc = jnp.zeros((m, n), jnp.float32)
    for g in range(ops.ws.shape[0]):
        part = jnp.matmul(x[:, g * grp:(g + 1) * grp], w[g * grp:(g + 1) * grp])
        acc = acc + part.astype(jnp.float32) * ops.ws[None, g, :] * ops.xs[:, g, None]
    return _epilogue(acc, ops)


def _xla_2d(ops: _Operands) -> jax.Array:
    m, k, n = ops.mkn
    g = k // ops.group
    w = unpack_group_weights(ops.w, ops.group).reshape(g, ops.group, n)
    x = ops.x2.reshape(m, g, ops.group)
    part = jax.lax.dot_general(  # (G, M, N) int32: batch over groups
        x, w, (((2,), (1,)), ((1,), (0,))), preferred_element_type=jnp.int32
    )
    scaled = part.astype(jnp.float32) * ops.ws[:, None, :] * ops.xs.T[:, :, None]
    return _epilogue(jnp.sum(scaled, axis=0), ops)


def _w4a4_kernel(x_ref, xs_ref, w_ref, ws_ref, *refs, m, n, bm, bn, hg, dk, n_groups, gps,
                 has_lr, has_bias, lr_precision, out_dtype):
    """One (bm, bn) output tile. Loops over K inside the kernel, `gps` groups per iteration
    (the G % gps remaining groups after the loop); per group two int8 dots per `dk`-deep chunk
    (low nibbles: the group's first half of rows, high nibbles: the second half), then the
    int32 partial product scaled in f32. `xs_ref` holds the transposed scales (G, bm)."""
    refs = list(refs)
    lx_ref, lu_ref = (refs.pop(0), refs.pop(0)) if has_lr else (None, None)
    b_ref = refs.pop(0) if has_bias else None
    (o_ref,) = refs
    rows = pl.program_id(0) * bm + jnp.arange(bm)
    cols = pl.program_id(1) * bn + jnp.arange(bn)
    row_ok, col_ok = rows < m, cols < n

    def one_group(g, acc):
        kb, xk = g * hg, g * 2 * hg
        part = None
        for c in range(hg // dk):
            w = plgpu.load(w_ref.at[pl.ds(pl.multiple_of(kb + c * dk, dk), dk), :],
                           mask=col_ok[None, :], other=0)
            for s in range(2):  # nibble s holds rows [s * hg, (s + 1) * hg) of the group
                xo = pl.multiple_of(xk + s * hg + c * dk, dk)
                x = plgpu.load(x_ref.at[:, pl.ds(xo, dk)], mask=row_ok[:, None], other=0)
                d = jnp.dot(x, unpack_field(w, 4, s), preferred_element_type=jnp.int32)
                part = d if part is None else part + d
        xs = plgpu.load(xs_ref.at[g], mask=row_ok, other=0.0)
        ws = plgpu.load(ws_ref.at[g], mask=col_ok, other=0.0)
        # (part * w_scale) * x_scale: a convert, a multiply and a fused multiply-add per
        # element and group (the outer product of the scales first would cost one more)
        return acc + part.astype(jnp.float32) * ws[None, :] * xs[:, None]

    def step(t, acc):
        for j in range(gps):
            acc = one_group(t * gps + j, acc)
        return acc

    acc = jax.lax.fori_loop(0, n_groups // gps, step, jnp.zeros((bm, bn), jnp.float32))
    for g in range(n_groups - n_groups % gps, n_groups):
        acc = one_group(jnp.int32(g), acc)  # a traced index: the ref indexers want arrays
    if has_lr:
        lx = plgpu.load(lx_ref, mask=row_ok[:, None], other=0)
        lu = plgpu.load(lu_ref, mask=col_ok[None, :], other=0)
        acc = acc + jnp.dot(lx, lu, preferred_element_type=jnp.float32, precision=lr_precision)
    if has_bias:
        acc = acc + plgpu.load(b_ref, mask=col_ok, other=0.0)[None, :]
    plgpu.store(o_ref, acc.astype(out_dtype), mask=row_ok[:, None] & col_ok[None, :])


def check_pallas_group(group: int) -> None:
    """The Pallas kernel's constraint: ``group // 2`` a power of two >= 16."""
    hg = group // 2
    if hg < MIN_BLOCK or hg & (hg - 1):
        raise ValueError(
            f"the Pallas W4A4 kernel needs group // 2 to be a power of two >= {MIN_BLOCK} "
            f"(group 32, 64, 128, ...), got group={group}; use backend='xla' or 'reference'"
        )


def _next_pow2(v: int, lo: int = MIN_BLOCK) -> int:
    return max(lo, 1 << max(v - 1, 0).bit_length())


def _pallas_2d(ops: _Operands, tiles: GemmTiles, interpret: bool) -> jax.Array:
    m, k, n = ops.mkn
    hg = ops.group // 2
    g = k // ops.group
    bm, bn, bk = tiles.block_m_for(m), tiles.block_n, tiles.block_k
    dk = min(hg, bk)
    has_lr, has_bias = ops.lu is not None, ops.bias is not None
    operands = [ops.x2, ops.xs.T, ops.w, ops.ws]
    in_specs = [
        pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
        pl.BlockSpec((g, bm), lambda i, j: (0, i)),
        pl.BlockSpec((k // 2, bn), lambda i, j: (0, j)),
        pl.BlockSpec((g, bn), lambda i, j: (0, j)),
    ]
    lr_precision = None
    if has_lr:
        r = ops.lu.shape[0]
        rp = _next_pow2(r)  # a Triton dot needs power-of-two dims >= 16: zero rank columns
        operands += [jnp.pad(ops.lx, ((0, 0), (0, rp - r))), jnp.pad(ops.lu, ((0, rp - r), (0, 0)))]
        in_specs += [pl.BlockSpec((bm, rp), lambda i, j: (i, 0)),
                     pl.BlockSpec((rp, bn), lambda i, j: (0, j))]
        lr_precision = _branch_precision(ops.lu.dtype)
    if has_bias:
        operands.append(ops.bias)
        in_specs.append(pl.BlockSpec((bn,), lambda i, j: (j,)))
    kernel = functools.partial(
        _w4a4_kernel, m=m, n=n, bm=bm, bn=bn, hg=hg, dk=dk, n_groups=g,
        gps=max(1, bk // hg), has_lr=has_lr, has_bias=has_bias, lr_precision=lr_precision,
        out_dtype=ops.out_dtype,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), ops.out_dtype),
        grid=(pl.cdiv(m, bm), pl.cdiv(n, bn)),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiles.num_warps, num_stages=tiles.num_stages
        ),
        interpret=interpret,
        name=f"w4a4_g{ops.group}_gemm",
    )(*operands)


def w4a4_matmul_reference(
    x_q: jax.Array,
    w_packed: jax.Array,
    *,
    x_scale: jax.Array,
    w_scale: jax.Array,
    group: int = DEFAULT_GROUP,
    lr_x: jax.Array | None = None,
    lr_up: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype=jnp.float32,
) -> jax.Array:
    """Plain definition: unpack with jnp, one int32 matmul per group, scaled and summed in f32
    in group order, then the low-rank product and the bias."""
    ops = _prepare(x_q, w_packed, x_scale, w_scale, group, lr_x, lr_up, bias, out_dtype)
    return _finish(_reference_2d(ops), ops)


def w4a4_matmul(
    x_q: jax.Array,
    w_packed: jax.Array,
    *,
    x_scale: jax.Array,
    w_scale: jax.Array,
    group: int = DEFAULT_GROUP,
    lr_x: jax.Array | None = None,
    lr_up: jax.Array | None = None,
    bias: jax.Array | None = None,
    out_dtype=jnp.float32,
    backend: str = "auto",
    tiles: GemmTiles | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Group-scaled W4A4 GEMM plus optional low-rank branch and bias; shape (..., N).

    See the module docstring for the operands. `tiles` (`GemmTiles`; None = defaults) shapes
    the Pallas kernel only: ``block_k`` counts packed rows per K step, so one step covers
    ``max(1, block_k // (group // 2))`` groups, each as two int8 dots (one per nibble) of depth
    ``min(group // 2, block_k)``; tiles do not change the result. No tuned tiles apply (the
    `tuning` files hold W8A8 / W4A8 entries only).
    """
    backend = resolve_backend(backend)
    interpret = resolve_interpret(interpret)
    ops = _prepare(x_q, w_packed, x_scale, w_scale, group, lr_x, lr_up, bias, out_dtype)
    tiles = resolve_tiles(tiles, GemmTiles)
    if backend == "reference":
        y = _reference_2d(ops)
    elif backend == "xla":
        y = _xla_2d(ops)
    else:
        check_pallas_group(group)
        y = _pallas_2d(ops, tiles, interpret)
    return _finish(y, ops)
