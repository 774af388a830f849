"""Quantized NHWC convolution (3x3 stride 1/2 with padding 1, 1x1, any KHxKW) as an int8 GEMM.

Strategy: explicit im2col in XLA, then the same GEMM kernels as Dense layers (`int8_matmul`,
`w4a8_matmul`). Why: one tested kernel serves every quantized layer, and on the CPU here the
im2col gather is a small part of the time (SDXL 64x64x320 3x3, XLA: im2col 2-19 ms next to
26-120 ms for the int8 GEMM, i.e. 7-13 % of the im2col+GEMM time, and im2col+GEMM within
10-20 % of XLA's own int8 convolution; noisy shared 2-core machine, `benchmarks/bench_kernels.py`
re-measures it). Pallas in interpret mode says nothing about speed. The cost is a 9x larger int8
activation tensor in memory for 3x3 layers; an implicit-GEMM Pallas kernel (gathered,
boundary-masked loads per tap) would avoid it, but its benefit can only be measured on a GPU,
which this project's development machine lacks.

Padding uses the activation zero point, not 0: a padded pixel must dequantize to 0.0, i.e.
carry the code ``a_zp`` (the Flax/PyTorch convolution pads the float input with zeros).

Weights: HWIO (Flax layout) int8 codes, or the GEMM matrix ``w.reshape(KH*KW*Cin, Cout)`` for
packed int4/int2 weights (`conv_weight_matrix`, then `packing.pack_weights`), with per-Cout
scales.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.backend import resolve_backend
from pallas_kernels.config import GemmTiles, resolve_tiles
from pallas_kernels.gemm import apply_epilogue, prepare_gemm
from pallas_kernels.int8_matmul import int8_matmul, weight_column_sums
from pallas_kernels.packing import unpack_weights
from pallas_kernels.w4a8_matmul import w4a8_matmul


def conv_weight_matrix(w_hwio: jax.Array) -> jax.Array:
    """HWIO kernel -> (KH*KW*Cin, Cout) GEMM matrix, rows ordered like `im2col` columns."""
    return w_hwio.reshape(-1, w_hwio.shape[-1])


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def im2col(x: jax.Array, kernel_size: tuple[int, int], stride: int, padding: int, pad_value):
    """(B, H, W, C) -> (B, Ho, Wo, KH*KW*C) patches, columns ordered (kh, kw, c)."""
    kh, kw = kernel_size
    b, h, w, c = x.shape
    ho, wo = _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding)
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    xp = jnp.pad(x, pad, constant_values=jnp.asarray(pad_value, x.dtype))
    taps = [
        xp[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride, :]
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.concatenate(taps, axis=-1)


def _weights_hwio(w, kernel_size, weight_bits):
    """Unpacked int8 HWIO weights from either accepted weight form."""
    if weight_bits != 8:
        w = unpack_weights(w, weight_bits)
    if w.ndim == 4:
        return w
    kh, kw = kernel_size
    return w.reshape(kh, kw, w.shape[0] // (kh * kw), w.shape[1])


def int8_conv2d_reference(
    x_q, w, *, kernel_size=None, stride=1, padding=1, weight_bits=8, a_scale=1.0,
    a_zero_point=0, w_scale=None, bias=None, out_dtype=jnp.float32,
):
    """Per-tap int32 accumulation of (x_q - zp) zero-padded; independent of im2col."""
    w4 = _weights_hwio(w, kernel_size, weight_bits).astype(jnp.int32)
    kh, kw = w4.shape[:2]
    xc = x_q.astype(jnp.int32) - jnp.asarray(a_zero_point, jnp.int32)
    xp = jnp.pad(xc, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = _out_size(x_q.shape[1], kh, stride, padding)
    wo = _out_size(x_q.shape[2], kw, stride, padding)
    hs, ws = stride * (ho - 1) + 1, stride * (wo - 1) + 1
    acc = 0
    for i in range(kh):
        for j in range(kw):
            tap = xp[:, i : i + hs : stride, j : j + ws : stride]
            acc = acc + jnp.einsum("bhwc,co->bhwo", tap, w4[i, j])
    if jnp.dtype(out_dtype) == jnp.int32:
        return acc
    scale = jnp.asarray(w_scale, jnp.float32) * jnp.asarray(a_scale, jnp.float32)
    b = 0.0 if bias is None else jnp.asarray(bias, jnp.float32)
    return (acc.astype(jnp.float32) * scale + b).astype(out_dtype)


def int8_conv2d(
    x_q: jax.Array,
    w: jax.Array,
    *,
    kernel_size: tuple[int, int] | None = None,
    stride: int = 1,
    padding: int = 1,
    weight_bits: int = 8,
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
    """Quantized conv of int8 NHWC codes; epilogue and backends as in `int8_matmul`.

    w: int8 HWIO codes (weight_bits=8), or the 2-D GEMM matrix (int8, or packed int4/int2 with
    weight_bits 4/2) together with `kernel_size`. "pallas" = im2col + the Pallas GEMM;
    "xla" = `lax.conv_general_dilated` int8 -> int32 (cuDNN on GPU) + the same epilogue.
    `tiles` and `interpret` are those of the Pallas GEMM (`int8_matmul` / `w4a8_matmul`).
    """
    backend = resolve_backend(backend)
    resolve_tiles(tiles, GemmTiles)  # validated here; None stays None (GEMM: tuned or default)
    if w.ndim == 4:
        if weight_bits != 8:
            raise ValueError("packed weights must be given as the 2-D GEMM matrix")
        kernel_size = w.shape[:2]
    elif kernel_size is None:
        raise ValueError("kernel_size is required with 2-D (GEMM matrix) weights")
    common = dict(
        a_scale=a_scale, a_zero_point=a_zero_point, w_scale=w_scale, bias=bias,
        out_dtype=out_dtype,
    )
    if backend == "reference":
        return int8_conv2d_reference(
            x_q, w, kernel_size=kernel_size, stride=stride, padding=padding,
            weight_bits=weight_bits, **common,
        )
    if backend == "pallas":
        patches = im2col(x_q, kernel_size, stride, padding, a_zero_point)
        w2 = conv_weight_matrix(w) if w.ndim == 4 else w
        pallas = dict(backend="pallas", tiles=tiles, interpret=interpret)
        if weight_bits == 8:
            return int8_matmul(patches, w2, colsum=colsum, **common, **pallas)
        return w4a8_matmul(patches, w2, bits=weight_bits, colsum=colsum, **common, **pallas)
    w4 = _weights_hwio(w, kernel_size, weight_bits)
    colsum = weight_column_sums(conv_weight_matrix(w4)) if colsum is None else colsum
    _, out_dtype, (zc, scale, b) = prepare_gemm(
        x_q, x_q.shape[-1], w4.shape[-1], colsum=colsum, **common
    )
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    xp = jnp.pad(x_q, pad, constant_values=jnp.asarray(a_zero_point, jnp.int8))
    acc = jax.lax.conv_general_dilated(
        xp, w4, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.int32,
    )
    return apply_epilogue(acc, zc, scale, b, out_dtype)
