"""Activation quantization against a numpy statement of the quantizer (bit exact)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import (
    QuantizeTiles,
    activation_qparams,
    dequantize_activation,
    quantize_activation,
)

BACKENDS = ["pallas", "xla", "reference"]


def numpy_qparams(lo, hi, bits):
    lo, hi = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    scale = max(np.float32((hi - lo) * np.float32(1.0 / (2**bits - 1))), np.float32(1e-8))
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    zp = int(np.clip(qmin + np.round(-lo / scale), qmin, qmax))
    return scale, zp


def numpy_quantize(x, scale, zp, bits):
    v = np.round(x.astype(np.float32) / np.float32(scale)) + np.float32(zp)
    return np.clip(v, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int8)


def _inputs(rng, scale):
    x = rng.normal(0.3, 2.0, size=(3, 37, 11)).astype(np.float32)
    # .5 ties (exact when scale is a power of two), both signs, and far out-of-range values.
    ties = (np.arange(-40, 40, dtype=np.float32) + np.float32(0.5)) * np.float32(scale)
    x.reshape(-1)[: ties.size] = ties
    x.reshape(-1)[-4:] = [1e6, -1e6, 0.0, -0.0]
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("scale", [0.0625, 0.037])  # exact ties; near-ties where x/s != x*(1/s)
def test_quantize_matches_numpy(backend, bits, scale):
    rng = np.random.default_rng(bits)
    scale, zp = np.float32(scale), 2 ** (bits - 1) // 3 - 1
    x = _inputs(rng, scale)
    q = quantize_activation(jnp.asarray(x), scale, zp, bits=bits, backend=backend,
                            tiles=QuantizeTiles(block=256))
    assert q.dtype == jnp.int8 and q.shape == x.shape
    np.testing.assert_array_equal(np.asarray(q), numpy_quantize(x, scale, zp, bits))


@pytest.mark.parametrize("backend", ["pallas", "xla"])
def test_quantize_bf16_input(backend):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 50)).astype(ml_dtypes.bfloat16)
    scale, zp = activation_qparams(float(x.min()), float(x.max()), 8)
    q = quantize_activation(jnp.asarray(x), scale, zp, bits=8, backend=backend,
                            tiles=QuantizeTiles(block=128))
    expected = numpy_quantize(x.astype(np.float32), np.float32(scale), int(zp), 8)
    np.testing.assert_array_equal(np.asarray(q), expected)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("lo", "hi"), [(-1.3, 2.7), (0.5, 3.0), (-4.0, -0.25), (0.0, 0.0)])
def test_qparams_match_numpy_and_keep_zero_exact(bits, lo, hi):
    scale, zp = activation_qparams(lo, hi, bits)
    ref_scale, ref_zp = numpy_qparams(lo, hi, bits)
    assert np.float32(scale) == ref_scale and int(zp) == ref_zp
    q0 = quantize_activation(jnp.zeros((4,)), scale, zp, bits=bits, backend="xla")
    assert np.all(np.asarray(q0) == int(zp))
    assert np.all(np.asarray(dequantize_activation(q0, scale, zp)) == 0.0)


def test_error_within_half_step_inside_range():
    rng = np.random.default_rng(4)
    x = rng.uniform(-1.0, 3.0, size=(1000,)).astype(np.float32)
    scale, zp = activation_qparams(x.min(), x.max(), 8)
    q = quantize_activation(jnp.asarray(x), scale, zp, bits=8, backend="pallas",
                            tiles=QuantizeTiles(block=512))
    err = np.abs(np.asarray(dequantize_activation(q, scale, zp)) - x)
    assert err.max() <= 0.5 * float(scale) * (1 + 1e-5)
