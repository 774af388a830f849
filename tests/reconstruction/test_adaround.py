"""AdaRound against the paper's formulas written here in numpy: the rectified sigmoid, the
regulariser, BRECQ's annealing, the initialisation (h(V) = the fractional part), soft and hard
rounding on the project's grid, and folding the learned codes into a kernel the packer
quantizes back to exactly those codes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.deploy.packed import quantize_weight_codes
from mixdq_jax.quant.quantizers import quantize_weight
from mixdq_jax.reconstruction import (
    beta_schedule,
    fold_codes,
    init_rounding,
    learned_codes,
    nearest_codes,
    rectified_sigmoid,
    rounded_kernel,
    rounding_regularizer,
)

ZETA, GAMMA = 1.1, -0.1


def np_h(v):
    return np.clip(1.0 / (1.0 + np.exp(-v)) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def np_grid(w, bits):
    """Asymmetric min-max per output channel (last axis), the paper's quantizer."""
    lo = np.minimum(w.reshape(-1, w.shape[-1]).min(0), 0.0)
    hi = np.maximum(w.reshape(-1, w.shape[-1]).max(0), 0.0)
    levels = 2**bits - 1
    scale = np.maximum((hi - lo) * np.float32(1.0 / levels), 1e-8).astype(np.float32)
    zero = np.round(-lo / scale)
    return scale, zero, levels


def _kernel(seed=0, shape=(3, 3, 5, 4)):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_rectified_sigmoid_and_regulariser_match_the_formulas():
    v = np.linspace(-8, 8, 101).astype(np.float32)
    np.testing.assert_allclose(np.asarray(rectified_sigmoid(jnp.asarray(v))), np_h(v), atol=1e-6)
    assert float(rectified_sigmoid(jnp.float32(-30.0))) == 0.0
    assert float(rectified_sigmoid(jnp.float32(30.0))) == 1.0
    for beta in (20.0, 7.5, 2.0):
        want = np.sum(1.0 - np.abs(2.0 * np_h(v) - 1.0) ** beta)
        got = float(rounding_regularizer(jnp.asarray(v), beta))
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_beta_is_annealed_from_20_to_2_after_a_20_percent_warmup():
    iters = 1000

    def at(step):
        beta, on = beta_schedule(step, iters)
        return float(beta), bool(on)

    assert at(0) == (20.0, False)
    assert at(199) == (20.0, False)
    assert at(200) == (20.0, True)
    beta, on = at(600)
    assert on and beta == pytest.approx(2.0 + 18.0 * (1 - 400 / 800))
    assert at(1000)[0] == pytest.approx(2.0)


@pytest.mark.parametrize("bits", [2, 8])
def test_initialisation_reproduces_the_fractional_part(bits):
    w = _kernel(bits)
    v = np.asarray(init_rounding(jnp.asarray(w), bits))
    scale, zero, levels = np_grid(w, bits)
    x = w / scale
    np.testing.assert_allclose(np_h(v), x - np.floor(x), atol=2e-5)
    # soft rounding at initialisation is the float weight itself wherever the grid's clip
    # does not bind (each channel's min and max weights keep nearest rounding)
    soft = np.asarray(rounded_kernel(jnp.asarray(w), jnp.asarray(v), bits, soft=True))
    flat = w.reshape(-1, w.shape[-1])
    extreme = (w == flat.min(0)) | (w == flat.max(0))
    inside = (x + zero >= 0) & (x + zero <= levels) & ~extreme
    assert inside.mean() > 0.9
    np.testing.assert_allclose(soft[inside], w[inside], atol=float(scale.max()) * 1e-3)


@pytest.mark.parametrize("bits", [3, 4])
def test_soft_and_hard_rounding_follow_the_papers_quantizer(bits):
    w = _kernel(10 + bits)
    v = np.random.default_rng(bits).normal(size=w.shape).astype(np.float32) * 3
    scale, zero, levels = np_grid(w, bits)
    x = w / scale
    extreme = (w == w.reshape(-1, w.shape[-1]).min(0)) | (w == w.reshape(-1, w.shape[-1]).max(0))
    up_soft = np.where(extreme, np.round(x) - np.floor(x), np_h(v))
    want_soft = scale * (np.clip(np.floor(x) + up_soft + zero, 0, levels) - zero)
    got = np.asarray(rounded_kernel(jnp.asarray(w), jnp.asarray(v), bits, soft=True))
    np.testing.assert_allclose(got, want_soft, rtol=1e-5, atol=1e-6)
    up_hard = np.where(extreme, np.round(x) - np.floor(x), (v >= 0).astype(np.float32))
    want_codes = np.clip(np.floor(x) + up_hard + zero, 0, levels)
    codes = np.asarray(learned_codes(jnp.asarray(w), jnp.asarray(v), bits))
    np.testing.assert_array_equal(codes, want_codes)
    hard = np.asarray(rounded_kernel(jnp.asarray(w), jnp.asarray(v), bits, soft=False))
    np.testing.assert_allclose(hard, scale * (want_codes - zero), rtol=1e-6, atol=1e-7)
    # every code differs from nearest rounding by at most one step
    assert np.max(np.abs(codes - np.asarray(nearest_codes(jnp.asarray(w), bits)))) <= 1


@pytest.mark.parametrize(
    ("fmt", "bits", "split", "dtype"),
    [("int", 4, None, np.float32), ("int", 2, 2, np.float16), ("int", 8, None, np.float16),
     ("int_sym", 3, 3, np.float16)],
)  # fmt: skip
def test_folded_kernel_packs_to_the_learned_codes(fmt, bits, split, dtype):
    w = _kernel(7, (3, 3, 5, 6)).astype(dtype)
    v = np.random.default_rng(1).normal(size=w.shape).astype(np.float32)
    folded = fold_codes(jnp.asarray(w), jnp.asarray(v), bits, fmt=fmt, split=split)
    assert folded.dtype == w.dtype
    want = np.asarray(learned_codes(jnp.asarray(w), jnp.asarray(v), bits, fmt=fmt, split=split))
    parts = [(0, 5)] if split is None else [(0, split), (split, 5)]
    for a, b in parts:  # the packer, part by part, as `pack_layer` calls it
        codes, scale, zp = quantize_weight_codes(folded[..., a:b, :], bits, symmetric=fmt != "int")
        shift = 0 if fmt != "int" else 2 ** (bits - 1)
        np.testing.assert_array_equal(np.asarray(codes, np.float32) + shift, want[..., a:b, :])
    # the fake quantizer of the folded kernel is the hard learned rounding
    if split is None:
        fq = quantize_weight(folded.astype(jnp.float32), jnp.int32(bits), fmt=fmt)
        hard = rounded_kernel(jnp.asarray(w, jnp.float32), jnp.asarray(v), bits, fmt=fmt,
                              soft=False)  # fmt: skip
        np.testing.assert_allclose(np.asarray(fq), np.asarray(hard), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("v_sign", [-1.0, 1.0])
def test_exactly_symmetric_channels_fold(bits, v_sign):
    """A channel whose min is exactly -max (as random initialisations give, found on the
    full-size random SDXL) sits on a tie of the asymmetric grid: its low edge code is half a
    step outside the range. Learned rounding stays within the codes the packer gives the
    channel's extremes, so the fold keeps working (it used to fail with "the grid moved")."""
    w = np.random.default_rng(bits).uniform(-1.0, 1.0, size=(3, 3, 8, 6)).astype(np.float16)
    top = np.abs(w).reshape(-1, 6).max(0)
    w[0, 0, 0, :], w[0, 0, 1, :] = top, -top  # min == -max in every channel
    w = w.astype(np.float32)
    v = np.full(w.shape, 5.0 * v_sign, np.float32)  # everything down (or up)
    folded = fold_codes(jnp.asarray(w), jnp.asarray(v), bits, name="symmetric")
    want = np.asarray(learned_codes(jnp.asarray(w), jnp.asarray(v), bits))
    codes, _, _ = quantize_weight_codes(folded, bits, symmetric=False)
    np.testing.assert_array_equal(np.asarray(codes, np.float32) + 2 ** (bits - 1), want)
    near, _, _ = quantize_weight_codes(jnp.asarray(w), bits, symmetric=False)
    near = np.asarray(near, np.float32).reshape(-1, 6) + 2 ** (bits - 1)
    flat = want.reshape(-1, 6)
    assert (flat >= near.min(0)).all() and (flat <= near.max(0)).all()


def test_unknown_weight_format_is_refused():
    with pytest.raises(ValueError, match="fp8"):
        init_rounding(jnp.ones((2, 2)), 4, fmt="fp8")
