"""The learned-rounding mode is fake quantization with other rounding: with nearest-rounding
variables it reproduces `FakeQuant` bit for bit, shortcut-split and BOS-aware layers included,
and with the calibrated step sizes its LSQ activations match the calibrated quantizer."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.quant import FakeQuant, Observe, QuantSpec, intercept
from mixdq_jax.reconstruction import LearnedRounding, Rounding, init_step, learned_codes
from mixdq_jax.reconstruction.adaround import nearest_codes

SPLIT = "up.conv_shortcut"
BOS = "attn2.to_k"


class Net(nn.Module):
    @nn.compact
    def __call__(self, img, text):
        y = nn.Conv(6, (1, 1), name=SPLIT)(img)
        return y, nn.Dense(5, name=BOS)(text)


def _nearest_v(kernel, bits, split):
    codes = nearest_codes(kernel, bits, split=split)
    down = learned_codes(kernel, -jnp.ones(kernel.shape), bits, split=split)
    return jnp.where(codes > down, 1.0, -1.0)


def test_nearest_variables_reproduce_fake_quant_and_lsq_matches_the_calibrated_steps():
    img = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) * jnp.arange(1, 9)
    text = jax.random.normal(jax.random.key(1), (2, 7, 6))
    net = Net()
    params = net.init(jax.random.key(2), img, text)["params"]
    layers = {SPLIT: 3, BOS: None}
    with intercept(Observe(), QuantSpec().to_qconfig(layers)) as rec:
        net.apply({"params": params}, img, text)
    qconfig = QuantSpec(weight_bits=3, act_bits=6).to_qconfig(layers, rec.data)
    assert qconfig.layers[BOS].bos and qconfig.layers[SPLIT].split == 3

    def run(mode, cfg):
        def apply(cfg):
            with intercept(mode, cfg):
                return net.apply({"params": params}, img, text)

        return jax.jit(apply)(cfg)

    want = run(FakeQuant(), qconfig)
    v = {
        SPLIT: _nearest_v(params[SPLIT]["kernel"], 3, 3),
        BOS: _nearest_v(params[BOS]["kernel"], 3, None),
    }
    got = run(LearnedRounding(), Rounding(qconfig=qconfig, v=v, soft=jnp.float32(0.0)))
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    steps, zeros = {}, {}
    for name in layers:
        steps[name], zeros[name] = init_step(qconfig.layers[name].a_range, 6)
    lsq = run(LearnedRounding(), Rounding(qconfig=qconfig, v=v, a_step=steps, a_zero=zeros,
                                          soft=jnp.float32(0.0)))  # fmt: skip
    steps_only = run(LearnedRounding(), Rounding(qconfig=qconfig, a_step=steps, a_zero=zeros))
    for a, b, c in zip(want, lsq, steps_only, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)
