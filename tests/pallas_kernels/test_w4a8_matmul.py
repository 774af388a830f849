"""W4A8 / W2A8 GEMM with weights unpacked in the kernel: exact int32, then the epilogue."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import pack_weights, packed_column_sums, w4a8_matmul
from tests.pallas_kernels._gemm_cases import (
    SMALL_TILES,
    assert_epilogue_close,
    float_reference,
    int_reference,
    operands,
)

BACKENDS = ["pallas", "xla", "reference"]
# K must be a multiple of 8 // bits; segments of K/2 (int4) or K/4 (int2) are ragged here.
CASES = [(4, 77, 100, 70), (4, 64, 128, 96), (4, 3, 36, 20), (2, 77, 100, 70), (2, 3, 36, 20)]
TILES = dataclasses.replace(SMALL_TILES, block_k=16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("bits", "m", "k", "n"), CASES)
def test_int32_exact(backend, bits, m, k, n):
    lim = 2 ** (bits - 1)
    x_q, w_q, _, zp, _, _ = operands(np.random.default_rng(m * bits), m, k, n, -lim, lim - 1)
    acc = w4a8_matmul(x_q, pack_weights(w_q, bits), bits=bits, a_zero_point=zp,
                      out_dtype=jnp.int32, backend=backend, tiles=TILES)
    np.testing.assert_array_equal(np.asarray(acc), int_reference(x_q, w_q, zp))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_epilogue_matches_dequantized_float(backend, out_dtype):
    m, k, n = 77, 100, 70
    x_q, w_q, a_scale, zp, w_scale, bias = operands(np.random.default_rng(5), m, k, n, -8, 7)
    packed = pack_weights(w_q, 4)
    y = w4a8_matmul(x_q, packed, a_scale=a_scale, a_zero_point=zp, w_scale=w_scale,
                    colsum=packed_column_sums(packed), bias=bias, out_dtype=out_dtype,
                    backend=backend, tiles=TILES)
    ref, magnitude = float_reference(x_q, w_q, zp, a_scale, w_scale, bias)
    assert_epilogue_close(y, ref, magnitude, out_dtype)


def test_packed_column_sums():
    w_q = np.random.default_rng(0).integers(-8, 8, size=(12, 5)).astype(np.int8)
    np.testing.assert_array_equal(np.asarray(packed_column_sums(pack_weights(w_q, 4))),
                                  w_q.astype(np.int64).sum(0))


def test_errors():
    x = np.zeros((4, 8), np.int8)
    with pytest.raises(ValueError, match="K mismatch"):
        w4a8_matmul(x, np.zeros((8, 4), np.int8), out_dtype=jnp.int32, backend="xla")
    with pytest.raises(TypeError):
        w4a8_matmul(x, np.zeros((4, 4), np.uint8), out_dtype=jnp.int32, backend="xla")
    with pytest.raises(ValueError, match="bits"):
        w4a8_matmul(x, np.zeros((4, 4), np.int8), bits=3, backend="xla")
