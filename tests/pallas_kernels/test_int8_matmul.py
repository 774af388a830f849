"""W8A8 GEMM: exact int32 against numpy, epilogue against float of dequantized operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import GemmTiles, int8_matmul, weight_column_sums
from tests.pallas_kernels._gemm_cases import (
    SHAPES,
    SMALL_TILES,
    assert_epilogue_close,
    float_reference,
    int_reference,
    operands,
)

BACKENDS = ["pallas", "xla", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_int32_exact(backend, m, k, n):
    x_q, w_q, _, zp, _, _ = operands(np.random.default_rng(m + k + n), m, k, n)
    acc = int8_matmul(x_q, w_q, a_zero_point=zp, out_dtype=jnp.int32, backend=backend,
                      tiles=SMALL_TILES)
    assert acc.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(acc), int_reference(x_q, w_q, zp))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16", "float16"])
def test_epilogue_matches_dequantized_float(backend, out_dtype):
    m, k, n = 77, 100, 70
    x_q, w_q, a_scale, zp, w_scale, bias = operands(np.random.default_rng(7), m, k, n)
    y = int8_matmul(
        x_q, w_q, a_scale=a_scale, a_zero_point=zp, w_scale=w_scale,
        colsum=weight_column_sums(w_q), bias=bias, out_dtype=out_dtype, backend=backend,
        tiles=SMALL_TILES,
    )
    assert y.dtype == jnp.dtype(out_dtype) and y.shape == (m, n)
    ref, magnitude = float_reference(x_q, w_q, zp, a_scale, w_scale, bias)
    assert_epilogue_close(y, ref, magnitude, out_dtype)


def test_leading_dims_default_blocks_and_no_bias():
    rng = np.random.default_rng(1)
    x_q, w_q, a_scale, zp, w_scale, _ = operands(rng, 2 * 77, 64, 48)
    x3 = x_q.reshape(2, 77, 64)
    y = int8_matmul(x3, w_q, a_scale=a_scale, a_zero_point=zp, w_scale=w_scale,
                    backend="pallas")
    ref, magnitude = float_reference(x_q, w_q, zp, a_scale, w_scale, np.zeros(48, np.float32))
    assert y.shape == (2, 77, 48)
    assert_epilogue_close(np.asarray(y).reshape(-1, 48), ref, magnitude, "float32")


def test_scales_are_data_one_compile():
    """Scales and zero points are traced: a new calibration does not recompile."""
    rng = np.random.default_rng(2)
    x_q, w_q, _, _, w_scale, bias = operands(rng, 16, 32, 16)
    f = jax.jit(lambda a_s, zp: int8_matmul(x_q, w_q, a_scale=a_s, a_zero_point=zp,
                                            w_scale=w_scale, bias=bias, backend="pallas",
                                            tiles=SMALL_TILES))
    for a_s, zp in ((0.1, 3), (0.2, -5), (0.05, 0)):
        y = f(jnp.float32(a_s), jnp.int32(zp))
        ref, magnitude = float_reference(x_q, w_q, zp, np.float32(a_s), w_scale, bias)
        assert_epilogue_close(y, ref, magnitude, "float32")
    assert f._cache_size() == 1


def test_errors():
    x = np.zeros((4, 8), np.int8)
    w = np.zeros((8, 4), np.int8)
    with pytest.raises(ValueError, match="backend"):
        int8_matmul(x, w, backend="cuda")
    with pytest.raises(ValueError, match="w_scale"):
        int8_matmul(x, w, backend="xla")
    with pytest.raises(ValueError, match="K mismatch"):
        int8_matmul(np.zeros((4, 6), np.int8), w, out_dtype=jnp.int32, backend="xla")
    with pytest.raises(TypeError):
        int8_matmul(x.astype(np.float32), w, out_dtype=jnp.int32, backend="xla")
    with pytest.raises(ValueError, match="power of two"):
        int8_matmul(x, w, out_dtype=jnp.int32, backend="pallas",
                    tiles=GemmTiles(block_n=48))
