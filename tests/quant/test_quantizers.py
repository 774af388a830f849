"""Quantizers against independent numpy / ml_dtypes references, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mixdq_jax.quant import (
    FLOAT_BITS,
    fake_quant,
    quantize_activation,
    quantize_weight,
)

BITS = list(range(2, 9))


# ---- numpy references, written from the formulas (torch.round == np.round: half to even) ----
def np_asym(x, bits, lo, hi):
    x = np.asarray(x, np.float32)
    lo = np.minimum(np.asarray(lo, np.float32), np.float32(0))
    hi = np.maximum(np.asarray(hi, np.float32), np.float32(0))
    levels = np.float32(2**bits - 1)
    scale = np.maximum((hi - lo) * (np.float32(1) / levels), np.float32(1e-8))
    zero = np.round(-lo / scale)
    q = np.clip(np.round(x / scale) + zero, np.float32(0), levels)
    return ((q - zero) * scale).astype(np.float32)


def np_sym(x, bits, absmax):
    x = np.asarray(x, np.float32)
    qmax = np.float32(2 ** (bits - 1) - 1)
    scale = np.maximum(np.asarray(absmax, np.float32) * (np.float32(1) / qmax), np.float32(1e-8))
    q = np.clip(np.round(x / scale), -qmax - np.float32(1), qmax)
    return (q * scale).astype(np.float32)


def np_channel_range(w):
    axes = tuple(range(w.ndim - 1))
    return np.minimum(w.min(axis=axes), 0).astype(np.float32), np.maximum(
        w.max(axis=axes), 0
    ).astype(np.float32)


def np_fp8(x, absmax):
    x = np.asarray(x, np.float32)
    scale = np.maximum(
        np.asarray(absmax, np.float32) * (np.float32(1) / np.float32(448)), np.float32(1e-8)
    )
    y = np.clip(x / scale, np.float32(-448), np.float32(448))
    y = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    return (y * scale).astype(np.float32)


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return {
        "act": (rng.standard_normal((4, 33, 17)) * 3 + 0.7).astype(np.float32),
        "dense": (rng.standard_normal((24, 10)) * rng.uniform(0.01, 2, 10)).astype(np.float32),
        "conv": (rng.standard_normal((3, 3, 6, 5)) * 0.2 + 0.05).astype(np.float32),
    }


jit_act = jax.jit(lambda x, b, lo, hi: quantize_activation(x, b, lo, hi))
jit_w = jax.jit(lambda w, b: quantize_weight(w, b))
jit_w_sym = jax.jit(lambda w, b: quantize_weight(w, b, fmt="int_sym"))


@pytest.mark.parametrize("bits", BITS)
def test_per_tensor_matches_numpy(data, bits):
    x = data["act"]
    lo, hi = np.float32(-4.0), np.float32(6.5)  # part of x lies outside: clipped
    ref = np_asym(x, bits, lo, hi)
    _bits_equal(jit_act(x, jnp.int32(bits), lo, hi), ref)  # traced bits
    _bits_equal(quantize_activation(jnp.asarray(x), bits, lo, hi), ref)  # Python-int bits


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("bits", BITS)
def test_per_channel_matches_numpy(data, kind, bits):
    w = data[kind]
    lo, hi = np_channel_range(w)
    _bits_equal(jit_w(w, jnp.int32(bits)), np_asym(w, bits, lo, hi))
    _bits_equal(jit_w_sym(w, jnp.int32(bits)), np_sym(w, bits, np.maximum(-lo, hi)))


@pytest.mark.parametrize("fmt", ["int", "int_sym"])
def test_vmap_over_bits_matches_numpy(data, fmt):
    w, x = data["conv"], data["act"]
    lo, hi = np_channel_range(w)
    bits = jnp.asarray(BITS + [FLOAT_BITS], jnp.int32)
    got_w = jax.jit(jax.vmap(lambda b: quantize_weight(w, b, fmt=fmt)))(bits)
    got_a = jax.jit(jax.vmap(lambda b: fake_quant(x, b, -4.0, 6.5)))(bits)
    for i, b in enumerate(BITS):
        ref = np_asym(w, b, lo, hi) if fmt == "int" else np_sym(w, b, np.maximum(-lo, hi))
        _bits_equal(got_w[i], ref)
        _bits_equal(got_a[i], np_asym(x, b, -4.0, 6.5))
    _bits_equal(got_w[-1], w)  # 16 = float: untouched
    _bits_equal(got_a[-1], x)


def test_float_bits_pass_through(data):
    for arr in data.values():
        for b in (16, 32, 16.0):
            _bits_equal(jit_w(arr, jnp.asarray(b)), arr)
        _bits_equal(jit_act(arr, jnp.int32(16), 0.0, 0.0), arr)


def test_round_half_to_even():
    # lo=0, hi=255 at 8 bits: scale 1, so x lands exactly on halves
    x = np.array([0.5, 1.5, 2.5, 3.5, -0.5, 254.5], np.float32)
    got = np.asarray(fake_quant(jnp.asarray(x), 8, 0.0, 255.0))
    np.testing.assert_array_equal(got, [0.0, 2.0, 2.0, 4.0, 0.0, 254.0])


@pytest.mark.parametrize("bits", BITS)
def test_grid_and_error_bound(data, bits):
    w = data["dense"]
    got = np.asarray(jit_w(w, jnp.int32(bits)))
    lo, hi = np_channel_range(w)
    step = (hi - lo) / (2**bits - 1)
    for c in range(w.shape[-1]):
        assert len(np.unique(got[:, c])) <= 2**bits
    assert np.all(np.abs(got - w) <= step * 0.5 + 1e-6)
    zero_in = np.asarray(jit_w(np.zeros_like(w), jnp.int32(bits)))
    np.testing.assert_array_equal(zero_in, 0.0)  # all-zero channels: no NaN


def test_keeps_dtype():
    x = jnp.linspace(-2, 3, 50, dtype=jnp.bfloat16)
    assert fake_quant(x, 8, -2.0, 3.0).dtype == jnp.bfloat16
    assert quantize_weight(x.reshape(10, 5), 4).dtype == jnp.bfloat16


def test_fp8_cast_matches_ml_dtypes():
    # every finite e4m3 value, plus midpoints between neighbours (ties to even) and subnormals
    grid = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.sort(grid[np.isfinite(grid)])
    mids = (grid[:-1] + grid[1:]) / 2
    vals = np.concatenate([grid, mids, np.linspace(-448, 448, 4001, dtype=np.float32)])
    got = jax.jit(lambda v: v.astype(jnp.float8_e4m3fn).astype(jnp.float32))(vals)
    ref = vals.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    _bits_equal(got, ref)


def test_fp8_quantizers_match_reference(data):
    w, x = data["conv"], data["act"]
    lo, hi = np_channel_range(w)
    got = jax.jit(lambda w, b: quantize_weight(w, b, fmt="fp8"))(w, jnp.int32(8))
    _bits_equal(got, np_fp8(w, np.maximum(-lo, hi)))
    got = jax.jit(lambda x, b: quantize_activation(x, b, -4.0, 6.5, fmt="fp8"))(x, jnp.int32(8))
    _bits_equal(got, np_fp8(x, np.float32(6.5)))
    # bits >= 16 is float in FP8 mode too
    _bits_equal(quantize_weight(jnp.asarray(w), FLOAT_BITS, fmt="fp8"), w)


def test_unknown_format_rejected(data):
    with pytest.raises(ValueError, match="weight format"):
        quantize_weight(jnp.asarray(data["dense"]), 4, fmt="int4")
    with pytest.raises(ValueError, match="activation format"):
        quantize_activation(jnp.asarray(data["act"]), 4, 0.0, 1.0, fmt="int_sym")
