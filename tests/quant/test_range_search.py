"""Q-Diffusion's clipping-range search (``scale_method 'mse'``), checked against numpy: the
weight search picks, per output channel (and input part of a split layer), the ratio of
lowest Lp error of an independent asymmetric quantizer; the activation search picks, per
tensor part, the ratio of lowest Lp error summed over every input the layer sees."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.quant import QuantSpec
from mixdq_jax.quant.range_search import (
    clip_kernel,
    clip_ratios,
    search_act_ranges,
    search_weight_clip,
)

P = 2.4


def np_quant_range(x, bits, lo, hi):
    """Asymmetric uniform quantization of ``x`` on ``[lo, hi]`` (widened to contain 0), as
    Q-Diffusion's ``UniformAffineQuantizer.quantize``: scale, rounded zero point, clamp."""
    levels = 2**bits - 1
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    scale = np.maximum((hi - lo) / levels, 1e-8)
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, levels) - zero) * scale


def np_weight_errors(w, bits, ratios):
    """``[ratios, out]``: mean |w - Q_r(w)|^p over each output channel (last axis)."""
    flat = w.reshape(-1, w.shape[-1]).astype(np.float64)
    lo, hi = flat.min(0), flat.max(0)
    return np.stack([
        np.mean(np.abs(flat - np_quant_range(flat, bits, r * lo, r * hi)) ** P, axis=0)
        for r in ratios.astype(np.float64)
    ])  # fmt: skip


def test_the_grid_is_upstreams():
    ratios = clip_ratios()
    assert ratios.shape == (80,) and ratios.dtype == np.float32
    np.testing.assert_allclose(ratios, [1.0 - i * 0.01 for i in range(80)], rtol=1e-6)
    with pytest.raises(ValueError, match="must stay above 0"):
        clip_ratios(101, 0.01)


@pytest.mark.parametrize("split", [None, 5])
def test_weight_search_is_numpys_argmin_of_the_lp_error(split):
    rng = np.random.default_rng(0)
    kernel = rng.standard_t(3.0, size=(3, 3, 12, 16)).astype(np.float32)  # heavy tails
    ratios = clip_ratios()
    got = search_weight_clip(jnp.asarray(kernel), 4, ratios, p=P, split=split)
    parts = [(0, 12)] if split is None else [(0, split), (split, 12)]
    assert got.shape == (len(parts), 16)
    clipped = np.asarray(clip_kernel(jnp.asarray(kernel), ratios[got], split=split))
    for j, (a, b) in enumerate(parts):
        w = kernel[..., a:b, :]
        errors = np_weight_errors(w, 4, ratios)
        want = np.argmin(errors, axis=0)
        np.testing.assert_array_equal(got[j], want)
        # the clipped kernel's own min/max per channel is the searched range
        lo, hi = w.reshape(-1, 16).min(0), w.reshape(-1, 16).max(0)
        c = clipped[..., a:b, :].reshape(-1, 16)
        np.testing.assert_allclose(c.min(0), ratios[want] * lo, rtol=1e-6)
        np.testing.assert_allclose(c.max(0), ratios[want] * hi, rtol=1e-6)
    assert (got > 0).any()  # clipping pays somewhere on heavy tails


class Tiny(nn.Module):
    """fc1 -> gelu, then fc2 on ``[hidden, x]`` (a shortcut-split input, as an up block's)."""

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(12, name="fc1")(x))
        return nn.Dense(5, name="fc2")(jnp.concatenate([h, x], axis=-1))


def test_act_search_is_numpys_argmin_over_every_calibration_input():
    rng = np.random.default_rng(1)
    x = (rng.standard_t(4.0, size=(20, 7)) * 2.0).astype(np.float32)
    model = Tiny()
    params = model.init(jax.random.key(0), x)["params"]
    # float weights: the inputs numpy computes below are the model's own
    qconfig = QuantSpec(weight_bits=16, act_bits=4).to_qconfig(
        {"fc1": None, "fc2": 12}, {"fc1": np.zeros((1, 2)), "fc2": np.zeros((2, 2))}
    )
    ratios = clip_ratios()
    found = search_act_ranges(lambda p, b: model.apply({"params": p}, b["x"]), params, qconfig,
                              {"x": x}, ratios=ratios, p=P, batch_size=8)  # 8 + 8 + 4  # fmt: skip

    w1, b1 = np.asarray(params["fc1"]["kernel"]), np.asarray(params["fc1"]["bias"])
    pre = x.astype(np.float64) @ w1 + b1
    hidden = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
    inputs = {"fc1": [x], "fc2": [hidden, x]}  # fc2's two input parts
    for name, parts in inputs.items():
        assert found.index[name].shape == (len(parts),)
        for j, a in enumerate(parts):
            lo, hi = min(a.min(), 0.0), max(a.max(), 0.0)
            np.testing.assert_allclose(found.base[name][j], [lo, hi], rtol=1e-5, atol=1e-6)
            errors = [np.sum(np.abs(a - np_quant_range(a, 4, r * lo, r * hi)) ** P)
                      for r in ratios.astype(np.float64)]  # fmt: skip
            np.testing.assert_allclose(found.errors[name][j], errors, rtol=1e-4)
            want = int(np.argmin(errors))
            assert found.index[name][j] == want
            np.testing.assert_allclose(found.ranges[name][j], ratios[want] * np.array([lo, hi]),
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
    assert any((i > 0).any() for i in found.index.values())  # some tensor is clipped
    # float activations are not searched
    float_acts = QuantSpec(weight_bits=16, act_bits=16).to_qconfig({"fc1": None, "fc2": 12})
    none = search_act_ranges(lambda p, b: model.apply({"params": p}, b["x"]), params,
                             float_acts, {"x": x}, ratios=ratios)  # fmt: skip
    assert none.ranges == {}
