"""SVDQuant's group format (W4A4 with a 16-bit low-rank branch) frozen and run for real.

The fake-quant ground truth is `mixdq_jax.quant.modes._grouped_call`; this module stores and
runs the same math:

    xs = x / smooth                                   (no smoothing without a branch)
    y  = Q_g(xs) Q_g(smooth W - down up) + (xs * down) up + bias

with ``Q_g`` symmetric group quantization along the input channels (`pallas_kernels.grid`'s
group functions): weights per output channel in groups of ``group`` input channels (per
kernel position for a conv), activations per token, dynamically (no calibrated range).

**Storage** (the packed node of a grouped layer, see `packed`): the residual's codes as the
GEMM matrix ``(K_pad, N)`` with ``K_pad = positions * ceil(cin / group) * group`` (each kernel
position's channels zero-padded to whole groups, as the fake grouping pads them), int4 fields
packed two per byte *group-aligned* (`pallas_kernels.pack_group_weights`: byte ``g h + j``,
``h = group / 2``, holds rows ``g group + j`` and ``g group + h + j``; 2- and 3-bit codes use
the int4 fields) or int8 for 5..8 bits; the group scales f32 ``(K_pad / group, N)``; the
smoothing vector in f32, the branch factors in float16 (:data:`BRANCH_DTYPE`).

**fp16 rounding of the branch is the only difference from the fake-quant model**: the
residual ``smooth W - down up`` is formed and quantized from the decomposition as given
(f32), with the fake quantizer's own functions, so the stored codes and scales are exactly
the fake-quant weights, and ``smooth`` is stored in f32 (``Cin`` floats a layer: about 0.1 %
of SDXL's stored bytes), so ``x / smooth`` and hence every activation code is the fake
quantizer's too. Only ``down`` and ``up`` are stored in float16 (:data:`BRANCH_DTYPE`): the
branch's output moves by about 2^-11 of itself, linearly (it feeds no quantizer). None at all
when the factors are fp16-representable (e.g. rounded when they are made). Why not fp16 for
``smooth`` too: a rounded ``x / smooth`` flips activation codes at rounding boundaries, a whole
4-bit step each (measured: up to 1e-2 relative RMS from the fake-quant layer, against ~1e-4
with ``smooth`` in f32); and why not round first and quantize the residual of the rounded
factors: that moves weight codes across boundaries instead (measured ~1e-2 too).

**Smoothing is divided at run time**, not folded into the previous layer: in a UNet the
previous op is a norm, a nonlinearity or an attention product, none of which commutes with a
per-channel division, so the vector is stored and ``x / smooth`` is one elementwise op.

**The GEMM** (:func:`grouped_matmul`): ``sum_g x_scale w_scale (x_codes . w_codes) + lr_x up +
bias``: `pallas_kernels.w4a4_matmul` (the W4A4 kernel) on the Pallas backend, and on XLA one
float dot of both operands dequantized (memory ``M K + K N``; the kernel's own XLA backend
materialises ``G M N`` int32 partial products, too much for SDXL's convs on a CPU).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import grid, im2col, pack_group_weights, unpack_group_weights, w4a4_matmul
from pallas_kernels.backend import resolve_backend
from pallas_kernels.w4a4_matmul import check_pallas_group

Array = jax.Array

BRANCH_DTYPE = jnp.float16
"""Storage dtype of the low-rank factors ``down`` and ``up`` (the 16-bit branch)."""
SMOOTH_DTYPE = jnp.float32
"""Storage dtype of the smoothing vector (see the module docstring: why not fp16)."""

LOWRANK_KEYS = ("smooth", "down", "up")
LORA_KEYS = ("branch_scale", "lora_slot")
"""Leaves added by runtime LoRA (`mixdq_jax.deploy.lora`): a per-column scale of the branch
(traced: a new LoRA scale needs no recompile) and which LoRA each column belongs to
(0: the exported SVD branch)."""


# ------------------------------------------------------------------------------ storage
def padded_cin(cin: int, group: int) -> int:
    """Input channels of one kernel position padded to whole groups."""
    return -(-cin // group) * group


def gemm_k(weight_shape: tuple[int, ...], group: int) -> int:
    """``K_pad``: the GEMM reduction length of a grouped layer's stored codes."""
    positions = int(np.prod(weight_shape[:-2], dtype=np.int64))
    return positions * padded_cin(int(weight_shape[-2]), group)


def branch_f32(lowrank: Any) -> tuple[Array, Array, Array]:
    """``(smooth, down, up)`` of a `LowRank` in f32, as the fake quantizer uses them."""
    return tuple(jnp.asarray(a, jnp.float32) for a in (lowrank.smooth, lowrank.down, lowrank.up))


def residual(kernel: Array, smooth: Array | None, down: Array | None, up: Array | None) -> Array:
    """``smooth W - down up`` in f32, as the fake quantizer forms it (``lowrank.smoothed_kernel``
    and ``lowrank.branch_kernel``)."""
    w = kernel.astype(jnp.float32)
    if smooth is None:
        return w
    w = w * smooth[:, None]
    if down is None:
        return w
    flat = down.reshape(-1, down.shape[-1]) @ up
    return w - flat.reshape(*down.shape[:-1], up.shape[-1])


def group_weight_codes(resid: Array, bits: int, group: int) -> tuple[Array, Array]:
    """``(codes int8 (K_pad, N), scale f32 (K_pad / group, N))`` of a kernel (Flax layout),
    per output channel in groups of input channels per kernel position: the codes of
    ``grid.group_fake_quant_kernel``, rows ordered (kernel position, padded channel)."""
    n = resid.shape[-1]
    moved = jnp.moveaxis(resid.astype(jnp.float32), -2, -1)  # [P..., N, cin]
    q, s = grid.group_codes(moved, bits, group)  # [P..., N, G, group], [P..., N, G, 1]
    codes = jnp.moveaxis(q, -3, -1).reshape(-1, n)  # [P..., G, group, N]
    scale = jnp.moveaxis(s[..., 0], -2, -1).reshape(-1, n)  # [P..., G, N]
    return codes.astype(jnp.int8), scale


def pack_codes(codes: Array, storage_bits: int, group: int) -> Array:
    """What is stored for int8 codes ``(K_pad, N)``: group-packed int4, or the int8 codes."""
    return pack_group_weights(codes, group) if storage_bits == 4 else codes


def stored_codes(w: Array, storage_bits: int, group: int) -> Array:
    """int8 codes ``(K_pad, N)`` from the stored ``w`` (packed int4 or int8)."""
    return unpack_group_weights(w, group) if storage_bits == 4 else w


def dequantized_kernel(
    w: Array, w_scale: Array, weight_shape: tuple[int, ...], storage_bits: int, group: int
) -> Array:
    """The float (f32) residual kernel in the Flax layout from its stored codes and scales."""
    codes = stored_codes(w, storage_bits, group).astype(jnp.float32)
    *pos, cin, n = weight_shape
    cp = padded_cin(cin, group)
    p = int(np.prod(pos, dtype=np.int64))
    deq = codes.reshape(p, cp // group, group, n) * w_scale.reshape(p, cp // group, 1, n)
    return deq.reshape(p, cp, n)[:, :cin].reshape(weight_shape)


# ------------------------------------------------------------------------------ the GEMM
def _pallas_group(group: int) -> bool:
    try:
        check_pallas_group(group)
    except ValueError:
        return False
    return True


def grouped_matmul(
    xq: Array,
    x_scale: Array,
    w: Array,
    w_scale: Array,
    *,
    group: int,
    storage_bits: int = 4,
    lr_x: Array | None = None,
    lr_up: Array | None = None,
    bias: Array | None = None,
    out_dtype: Any = jnp.float32,
    backend: str = "auto",
) -> Array:
    """``sum_g x_scale[m, g] w_scale[g, n] sum_{k in g} xq[m, k] w[k, n] + lr_x @ lr_up +
    bias``: ``xq`` int8 codes ``(M, K)``, ``x_scale`` f32 ``(M, K / group)``, ``w`` the
    stored weights (int4 group-packed ``(K/2, N)`` or int8 ``(K, N)``), ``w_scale`` f32
    ``(K / group, N)``.

    The one place the W4A4 kernel is called: `pallas_kernels.w4a4_matmul` for int4 storage
    on the ``pallas`` backend (``auto`` on a GPU; a group the Pallas kernel cannot tile, i.e.
    ``group / 2`` not a power of two >= 16, falls back to XLA) and on ``reference``; on
    ``xla`` (and for int8 storage) both operands dequantized to f32 and one dot at HIGHEST
    precision (the fake quantizer's sum in another order)."""
    backend = resolve_backend(backend)
    if storage_bits == 4 and (
        backend == "reference" or (backend == "pallas" and _pallas_group(group))
    ):
        return w4a4_matmul(
            xq, w, x_scale=x_scale, w_scale=w_scale, group=group, lr_x=lr_x, lr_up=lr_up,
            bias=bias, out_dtype=out_dtype, backend=backend,
        )  # fmt: skip
    m, k = xq.shape
    codes = stored_codes(w, storage_bits, group).astype(jnp.float32)
    n = codes.shape[-1]
    xd = (xq.astype(jnp.float32).reshape(m, k // group, group) * x_scale[..., None]).reshape(m, k)
    wd = (codes.reshape(k // group, group, n) * w_scale[:, None, :]).reshape(k, n)
    y = jnp.dot(xd, wd, precision=jax.lax.Precision.HIGHEST)
    if lr_x is not None:
        y = y + jnp.dot(lr_x.astype(jnp.float32), lr_up.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)  # fmt: skip
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


# ------------------------------------------------------------------------------ running
def smoothed_input(x: Array, p: dict) -> Array:
    """``x / smooth`` (in ``x``'s dtype, as the fake quantizer), or ``x`` without smoothing."""
    if "smooth" not in p:
        return x
    return (x.astype(jnp.float32) / p["smooth"].astype(jnp.float32)).astype(x.dtype)


def branch_low(module: nn.Module, down: Array, xs: Array) -> Array:
    """``xs`` through ``down`` in f32: a matrix for a Dense, the layer's own conv geometry
    (stride, padding) with ``rank`` outputs and no bias for a conv."""
    xf, d = xs.astype(jnp.float32), down.astype(jnp.float32)
    if d.ndim == 2:
        return jnp.dot(xf, d, precision=jax.lax.Precision.HIGHEST)
    conv = module.clone(parent=None, features=d.shape[-1], use_bias=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST)  # fmt: skip
    return conv.apply({"params": {"kernel": d}}, xf)


def branch_columns(module: nn.Module, p: dict, x: Array, *, skip: int = 0) -> Array | None:
    """The branch's low-rank activations ``(x / smooth) down * branch_scale`` (f32), or None
    for a layer without a branch; ``skip``: columns left out (zeroed), e.g. the exported SVD
    part for a BOS row that is stored exactly."""
    if "up" not in p:
        return None
    low = branch_low(module, p["down"], smoothed_input(x, p))
    scale = p.get("branch_scale")
    if skip:
        keep = (jnp.arange(low.shape[-1]) >= skip).astype(jnp.float32)
        scale = keep if scale is None else scale * keep
    return low if scale is None else low * scale.astype(jnp.float32)


def branch_output(module: nn.Module, p: dict, x: Array, *, skip: int = 0) -> Array | None:
    """``(x / smooth) down * branch_scale @ up`` in f32 (None without a branch)."""
    low = branch_columns(module, p, x, skip=skip)
    if low is None:
        return None
    return jnp.dot(low, p["up"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def group_act_codes(xs: Array, bits: int, group: int) -> tuple[Array, Array]:
    """``(codes int8 [..., C_pad], scales f32 [..., C_pad / group])`` per token."""
    q, s = grid.group_codes(xs, bits, group)
    return q.reshape(*q.shape[:-2], -1).astype(jnp.int8), s[..., 0]


def conv_patches(
    codes: Array, scales: Array, kernel_size: tuple[int, int], stride: int, padding: int
) -> tuple[Array, Array]:
    """im2col of per-pixel group codes ``(B, H, W, C_pad)`` and their scales ``(B, H, W, G)``:
    ``(B, Ho, Wo, positions * C_pad)`` codes and ``(B, Ho, Wo, positions * G)`` scales, columns
    ordered (kernel position, channel) like the stored weight rows; padding is code 0 (= 0.0,
    as the float conv pads with zeros)."""
    return (
        im2col(codes, kernel_size, stride, padding, 0),
        im2col(scales, kernel_size, stride, padding, 0),
    )
