"""Shared numpy references and operands for the GEMM tests (not a test module)."""

import numpy as np

from pallas_kernels import GemmTiles

F32_EPS = float(np.finfo(np.float32).eps)
# Small tiles so the tests cover several M/N tiles and a multi-step K loop.
SMALL_TILES = GemmTiles(block_m=32, block_n=32, block_k=32)
# (M, K, N): ragged M=77, N and K not multiples of the blocks, a divisible case, tiny K.
SHAPES = [(77, 100, 70), (64, 128, 96), (5, 36, 16)]


def int_reference(x_q, w_q, zp):
    """sum_k (x_q - zp) * w_q on int64."""
    return np.matmul(x_q.astype(np.int64) - zp, w_q.astype(np.int64))


def float_reference(x_q, w_q, zp, a_scale, w_scale, bias):
    """Float64 matmul of the dequantized operands, and a bound on |terms| for tolerances."""
    x = a_scale * (x_q.astype(np.float64) - zp)
    w = w_q.astype(np.float64) * w_scale.astype(np.float64)
    y = x @ w + bias.astype(np.float64)
    magnitude = np.abs(x) @ np.abs(w) + np.abs(bias)
    return y, magnitude


def assert_epilogue_close(y, ref, magnitude, out_dtype_name):
    """f32: a few f32 roundings of the terms (int->f32, scale product, multiply, bias add).
    bf16/f16 add one final rounding of the result (2**-9 / 2**-11 relative)."""
    final = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-10}[out_dtype_name]
    tol = 4 * F32_EPS * magnitude + final * np.abs(ref) + 1e-30
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= tol), f"max err/tol {np.max(err / tol):.3g}"


def operands(rng, m, k, n, w_lo=-128, w_hi=127):
    x_q = rng.integers(-128, 128, size=(m, k)).astype(np.int8)
    x_q[0, :] = -128  # extremes on both operands
    x_q[-1, :] = 127
    w_q = rng.integers(w_lo, w_hi + 1, size=(k, n)).astype(np.int8)
    w_q[:, 0] = w_lo
    w_q[:, -1] = w_hi
    a_scale = np.float32(0.037)
    zp = -17
    w_scale = rng.uniform(1e-3, 2e-2, size=(n,)).astype(np.float32)
    bias = rng.normal(size=(n,)).astype(np.float32)
    return x_q, w_q, a_scale, zp, w_scale, bias
