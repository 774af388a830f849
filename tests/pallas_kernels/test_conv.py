"""Quantized conv against jax.lax.conv_general_dilated on the dequantized operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import GemmTiles, conv_weight_matrix, int8_conv2d, pack_weights
from tests.pallas_kernels._gemm_cases import F32_EPS

BACKENDS = ["pallas", "xla", "reference"]
CASES = [((3, 3), 1, 1), ((3, 3), 2, 1), ((1, 1), 1, 0)]  # (kernel, stride, padding)
GEMM_TILES = GemmTiles(block_m=32, block_n=16, block_k=16)


def _operands(rng, kernel, cin=8, cout=24, w_lim=128):
    x_q = rng.integers(-128, 128, size=(2, 9, 9, cin)).astype(np.int8)
    w_q = rng.integers(-w_lim, w_lim, size=(*kernel, cin, cout)).astype(np.int8)
    w_scale = rng.uniform(1e-3, 2e-2, size=(cout,)).astype(np.float32)
    bias = rng.normal(size=(cout,)).astype(np.float32)
    return x_q, w_q, np.float32(0.05), -9, w_scale, bias


def _lax_conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), (stride, stride),
        ((padding, padding), (padding, padding)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


def _options(backend):
    return {"tiles": GEMM_TILES} if backend == "pallas" else {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("kernel", "stride", "padding"), CASES)
def test_int32_equals_conv_of_centered_codes(backend, kernel, stride, padding):
    """(x_q - zp) and w_q are small integers: the f32 conv of them is exact (|sums| < 2**24)."""
    x_q, w_q, _, zp, _, _ = _operands(np.random.default_rng(stride), kernel)
    acc = int8_conv2d(x_q, w_q, stride=stride, padding=padding, a_zero_point=zp,
                      out_dtype=jnp.int32, backend=backend, **_options(backend))
    expected = _lax_conv(x_q.astype(np.int32) - zp, w_q, stride, padding)
    assert acc.dtype == jnp.int32 and acc.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(expected).astype(np.int64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "out_dtype"),
    [(*case, "float32") for case in CASES] + [((3, 3), 2, 1, "bfloat16")],
)
def test_float_equals_conv_of_dequantized(backend, kernel, stride, padding, out_dtype):
    x_q, w_q, a_scale, zp, w_scale, bias = _operands(np.random.default_rng(11), kernel)
    y = int8_conv2d(x_q, w_q, stride=stride, padding=padding, a_scale=a_scale, a_zero_point=zp,
                    w_scale=w_scale, bias=bias, out_dtype=out_dtype, backend=backend,
                    **_options(backend))
    x = a_scale * (x_q.astype(np.float32) - zp)
    w = w_q.astype(np.float32) * w_scale
    ref = np.asarray(_lax_conv(x, w, stride, padding)) + bias
    magnitude = np.asarray(_lax_conv(np.abs(x), np.abs(w), stride, padding)) + np.abs(bias)
    final = {"float32": 0.0, "bfloat16": 2.0**-8}[out_dtype]
    # f32 reference conv itself rounds: allow ~K * eps of the term magnitudes on both sides.
    k = kernel[0] * kernel[1] * x_q.shape[-1]
    tol = (k + 4) * F32_EPS * magnitude + final * np.abs(ref)
    assert y.dtype == jnp.dtype(out_dtype)
    assert np.all(np.abs(np.asarray(y, np.float64) - ref) <= tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_int4_weights(backend):
    x_q, w_q, _, zp, _, _ = _operands(np.random.default_rng(3), (3, 3), w_lim=8)
    packed = pack_weights(conv_weight_matrix(w_q), 4)
    acc = int8_conv2d(x_q, packed, kernel_size=(3, 3), stride=2, padding=1, weight_bits=4,
                      a_zero_point=zp, out_dtype=jnp.int32, backend=backend,
                      **_options(backend))
    expected = _lax_conv(x_q.astype(np.int32) - zp, w_q, 2, 1)
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(expected).astype(np.int64))


def test_padding_uses_zero_point():
    """A constant input equal to the zero point is 0.0 everywhere, borders included."""
    x_q = np.full((1, 5, 5, 4), 7, np.int8)
    w_q = np.ones((3, 3, 4, 2), np.int8)
    for backend in BACKENDS:
        acc = int8_conv2d(x_q, w_q, a_zero_point=7, out_dtype=jnp.int32, backend=backend)
        assert not np.any(np.asarray(acc)), backend
