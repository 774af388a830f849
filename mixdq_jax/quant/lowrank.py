"""SVDQuant's low-rank branch (Li et al., ICLR 2025): smoothing, then a 16-bit rank-r branch.

A layer ``y = x W`` is rewritten as ``y = (x / s) (s W)``: the smoothing factors ``s`` (one per
input channel, SmoothQuant's ``s = max|x|^a / max|W|^(1-a)``) move the activations' outliers
into the weights. The smoothed weight's top ``r`` singular directions become a branch kept in
16 bits, ``s W ~= L1 L2 + R`` (``L1 = U_r diag(S_r)``, ``L2 = V_r^T``, the best rank-r
approximation), and only the residual ``R`` is quantized:

    y ~= Q(x / s) Q(R) + (x / s) L1 L2

with weights and activations in groups of 64 input channels (`pallas_kernels.grid`). The
migration strength ``a`` is searched per layer on calibration inputs (the released
deepcompressor config: a grid of 20 values minimising the layer's output error).

Everything here is a pure function of arrays; `LowRank` is the per-layer data the fake-quant
mode (`mixdq_jax.quant.modes`) and the packed export read. A conv kernel (HWIO) is the GEMM
``[kh * kw * cin, out]`` of its patches, so ``down`` has the kernel's shape with ``out``
replaced by the rank and runs as a conv, ``up`` as a Dense.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import grid

Array = jax.Array

LOWRANK_BITS = 4
"""Weight bit-widths up to this carry the branch (a traced select: one compile serves every
configuration); wider layers quantize the smoothed weight itself."""

ALPHAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(20))
"""The migration strengths searched per layer (deepcompressor's ``num_grids: 20``)."""

MIN_SMOOTH = 1e-5


def fraction_rank(k: int, n: int, rank: int, rank_fraction: float | None) -> int:
    """The branch rank of a ``[k, n]`` GEMM: ``rank``, or the rank whose branch holds
    ``rank_fraction`` of the weights, ``round(f k n / (k + n))`` (at least 1, at most
    ``rank``). One rule for the method's settings and the cost tables."""
    if rank_fraction is None:
        return rank
    return int(min(rank, max(1, round(rank_fraction * k * n / (k + n)))))


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class LowRank:
    """One layer's smoothing and branch: ``smooth`` ``(cin,)``, ``down`` the kernel's shape
    with ``out`` replaced by the rank, ``up`` ``(rank, out)``."""

    smooth: Array
    down: Array
    up: Array

    @property
    def rank(self) -> int:
        return int(self.up.shape[-2])

    @classmethod
    def shapes(cls, kernel_shape: Sequence[int], rank: int) -> LowRank:
        """The `LowRank` of a kernel of ``kernel_shape`` as ``jax.ShapeDtypeStruct``s (rank
        capped at the GEMM's sides, as :func:`low_rank` caps it): storage and BOPs without
        weights."""
        k, n = math.prod(kernel_shape[:-1]), int(kernel_shape[-1])
        r = min(rank, k, n)
        return cls(
            smooth=jax.ShapeDtypeStruct((int(kernel_shape[-2]),), jnp.float32),
            down=jax.ShapeDtypeStruct((*kernel_shape[:-1], r), jnp.float32),
            up=jax.ShapeDtypeStruct((r, n), jnp.float32),
        )


def smoothing(act_absmax: Array, kernel: Array, alpha: float) -> Array:
    """SmoothQuant's factors ``max|x_c|^a / max|W_c|^(1 - a)`` per input channel ``c``
    (``W_c``: every weight that multiplies channel ``c``); a dead channel keeps 1."""
    axes = tuple(i for i in range(kernel.ndim) if i != kernel.ndim - 2)
    w_max = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=axes)
    a_max = jnp.asarray(act_absmax, jnp.float32)
    s = jnp.power(jnp.maximum(a_max, MIN_SMOOTH), alpha) / jnp.power(
        jnp.maximum(w_max, MIN_SMOOTH), 1.0 - alpha
    )
    dead = (a_max <= 0) | (w_max <= 0)
    return jnp.where(dead, 1.0, jnp.maximum(s, MIN_SMOOTH))


def smoothed_kernel(kernel: Array, smooth: Array) -> Array:
    """``s W``: every input channel's weights times its factor."""
    return kernel.astype(jnp.float32) * smooth[:, None]


EXACT_SVD_MAX = 1024
"""Matrices whose smaller side is at most this get numpy-exact SVD; larger ones (SDXL's wide
convs: ``[11520, 1280]``) the randomized range finder, about 20x faster there."""
POWER_ITERATIONS = 4
OVERSAMPLING = 16


def low_rank(kernel: Array, rank: int) -> tuple[Array, Array]:
    """``(down, up)``: the best rank-``rank`` approximation of the kernel's GEMM
    ``[in, out]`` from its SVD (``down = U_r diag(S_r)`` in the kernel's shape, ``up = V_r^T``).
    The residual's squared Frobenius norm is the dropped singular values' energy (exactly for
    matrices up to `EXACT_SVD_MAX` wide; above it the SVD is the randomized one of Halko,
    Martinsson and Tropp 2011, Alg. 4.4: `POWER_ITERATIONS` power iterations with
    re-orthonormalisation, `OVERSAMPLING` extra columns, a fixed seed)."""
    flat = kernel.astype(jnp.float32).reshape(-1, kernel.shape[-1])
    r = min(rank, *flat.shape)
    if min(flat.shape) <= EXACT_SVD_MAX:
        u, s, vt = jnp.linalg.svd(flat, full_matrices=False)
    else:
        u, s, vt = _randomized_svd(flat, r + OVERSAMPLING)
    down = (u[:, :r] * s[:r]).reshape(*kernel.shape[:-1], r)
    return down, vt[:r]


def _randomized_svd(a: Array, width: int) -> tuple[Array, Array, Array]:
    omega = jax.random.normal(jax.random.key(0), (a.shape[1], width), jnp.float32)
    q, _ = jnp.linalg.qr(a @ omega)
    for _ in range(POWER_ITERATIONS):
        z, _ = jnp.linalg.qr(a.T @ q)
        q, _ = jnp.linalg.qr(a @ z)
    ub, s, vt = jnp.linalg.svd(q.T @ a, full_matrices=False)
    return q @ ub, s, vt


def branch_kernel(lowrank: LowRank) -> Array:
    """``L1 L2`` in the kernel's shape."""
    down = lowrank.down.reshape(-1, lowrank.down.shape[-1])
    return (down @ lowrank.up).reshape(*lowrank.down.shape[:-1], lowrank.up.shape[-1])


def decompose(kernel: Array, act_absmax: Array, *, alpha: float, rank: int) -> LowRank:
    """Smoothing at ``alpha`` and the rank-``rank`` branch of the smoothed kernel."""
    smooth = smoothing(act_absmax, kernel, alpha)
    down, up = low_rank(smoothed_kernel(kernel, smooth), rank)
    return LowRank(smooth=smooth, down=down, up=up)


def quantized_rows(
    rows: Array, kernel: Array, lowrank: LowRank, *, w_bits: int, a_bits: int, group: int
) -> Array:
    """The layer's output on patch rows (``[n, positions, cin]``: a Dense has one position,
    a conv ``kh * kw``) with weights and activations quantized in groups as the fake-quant
    mode does, the branch on at ``w_bits <= LOWRANK_BITS``."""
    n, positions, cin = rows.shape
    xs = rows.astype(jnp.float32) / lowrank.smooth
    on = w_bits <= LOWRANK_BITS
    resid = smoothed_kernel(kernel, lowrank.smooth) - (branch_kernel(lowrank) if on else 0.0)
    wq = grid.group_fake_quant_kernel(resid.reshape(positions, cin, -1), w_bits, group)
    xq = grid.group_fake_quant(xs, a_bits, group)
    out = jnp.einsum("npc,pco->no", xq, wq)
    if on:
        out = out + (xs.reshape(n, -1) @ lowrank.down.reshape(-1, lowrank.rank)) @ lowrank.up
    return out


@functools.partial(jax.jit, static_argnames=("rank", "group", "w_bits", "a_bits"))
def alpha_errors(
    kernel: Array, act_absmax: Array, rows: Array, alphas: Array, *,
    rank: int, group: int, w_bits: int, a_bits: int,
) -> Array:  # fmt: skip
    """The mean squared output error on ``rows`` of every migration strength in ``alphas``
    (one compiled program per layer shape; the alphas run one after another, so memory holds
    one decomposition at a time)."""
    flat = kernel.astype(jnp.float32).reshape(rows.shape[1], rows.shape[2], -1)
    ref = jnp.einsum("npc,pco->no", rows.astype(jnp.float32), flat)

    def one(alpha: Array) -> Array:
        lr = decompose(kernel, act_absmax, alpha=alpha, rank=rank)
        out = quantized_rows(rows, kernel, lr, w_bits=w_bits, a_bits=a_bits, group=group)
        return jnp.mean(jnp.square(out - ref))

    return jax.lax.map(one, alphas)


def search(
    kernel: Array,
    act_absmax: Array,
    rows: Array,
    *,
    rank: int,
    group: int,
    alphas: Sequence[float] = ALPHAS,
    w_bits: int = LOWRANK_BITS,
    a_bits: int = 4,
) -> tuple[LowRank, float, np.ndarray]:
    """The migration strength of least output error on ``rows`` (``[n, positions, cin]``
    patches of the layer's calibration inputs) at ``w_bits`` / ``a_bits``: ``(lowrank,
    alpha, errors per alpha)``. The error is the mean squared difference from the float
    layer's output; the first of equal errors wins."""
    if not len(alphas):
        raise ValueError("search: no alphas to try")
    errors = np.asarray(
        alpha_errors(jnp.asarray(kernel), jnp.asarray(act_absmax), jnp.asarray(rows),
                     jnp.asarray(alphas, jnp.float32), rank=rank, group=group,
                     w_bits=w_bits, a_bits=a_bits),
        np.float64,
    )  # fmt: skip
    errors = np.where(np.isfinite(errors), errors, np.inf)
    best = int(np.argmin(errors))
    alpha = float(alphas[best])
    return decompose(kernel, act_absmax, alpha=alpha, rank=rank), alpha, errors
