"""The one quantization grid against numpy formulas, and the three users agreeing on it:
fake quantization, the weight packer and the activation kernel's reference."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.deploy.packed import quantize_weight_codes
from mixdq_jax.quant import fake_quant, quantize_weight
from pallas_kernels import activation_qparams, dequantize_activation, grid
from pallas_kernels import quantize_activation_reference as quantize_codes


def _np_affine(lo, hi, bits):
    lo, hi = np.float32(min(lo, 0.0)), np.float32(max(hi, 0.0))
    levels = np.float32(2**bits - 1)
    scale = np.maximum((hi - lo) * (np.float32(1) / levels), np.float32(1e-8))
    return scale, np.round(-lo / scale), levels


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_affine_grid_matches_numpy(bits):
    rng = np.random.default_rng(bits)
    x = (rng.standard_normal(4096) * 3).astype(np.float32)
    lo, hi = -2.5, 4.0
    scale, zero, levels = grid.affine_params(lo, hi, bits)
    s, z, lv = _np_affine(lo, hi, bits)
    assert float(scale) == s and float(zero) == z and float(levels) == lv
    q = grid.codes(jnp.asarray(x), scale, zero, 0.0, levels)
    want_q = np.clip(np.round(x / s) + z, 0, lv)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(grid.dequantize(q, scale, zero), (want_q - z) * s)


def test_traced_bits_give_the_same_grid_as_static_bits():
    for bits in range(2, 9):
        static = grid.affine_params(-1.0, 3.0, bits)
        traced = grid.affine_params(-1.0, 3.0, jnp.asarray(bits, jnp.int32))
        for a, b in zip(static, traced, strict=True):
            assert float(a) == float(b)
    assert bool(grid.is_float(16)) and not bool(grid.is_float(8))


def test_zero_width_range_is_finite_and_exact_at_zero():
    scale, zero, levels = grid.affine_params(0.0, 0.0, 8)
    assert float(scale) == float(np.float32(grid.MIN_SCALE))
    q = grid.codes(jnp.zeros(3), scale, zero, 0.0, levels)
    np.testing.assert_array_equal(grid.dequantize(q, scale, zero), np.zeros(3))


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_kernel_reference_reproduces_fake_quant(bits):
    """The integer path's codes, dequantized, are the fake quantizer's output bit for bit."""
    rng = np.random.default_rng(0)
    x = jnp.asarray((rng.standard_normal((64, 32)) * 2).astype(np.float32))
    lo, hi = -3.1, 5.7
    scale, zp = activation_qparams(lo, hi, bits)
    real = dequantize_activation(quantize_codes(x, scale, zp, bits=bits), scale, zp)
    np.testing.assert_array_equal(real, fake_quant(x, bits, lo, hi))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_packer_reproduces_fake_quant(bits, symmetric):
    rng = np.random.default_rng(bits)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 8)).astype(np.float32))
    codes, scale, zp = quantize_weight_codes(w, bits, symmetric=symmetric)
    real = grid.dequantize(codes, scale, zp)
    fmt = "int_sym" if symmetric else "int"
    np.testing.assert_array_equal(real, quantize_weight(w, bits, fmt=fmt))
