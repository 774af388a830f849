"""PTQD's noise model against numpy: the regression recovers a planted correlation, channel
bias and residual spread; the correction lowers the error; folded into the output conv it is
the same correction and leaves the weight codes alone; the variance correction formula."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from mixdq_jax.deploy.packed import quantize_weight_codes
from mixdq_jax.reconstruction.ptqd import fit_noise, fold_into_output_layer
from mixdq_jax.schedulers.noise_correction import NoiseModel


def _planted(seed=0, steps=2):
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=(steps, 6, 3, 8, 8))
    k = np.array([0.08, -0.05][:steps])
    bias = rng.normal(size=(steps, 3)) * 0.1
    noise = rng.normal(size=eps.shape) * 0.02
    eps_q = (1 + k[:, None, None, None, None]) * eps + bias[:, None, :, None, None] + noise
    return eps, eps_q, k, bias


TIMESTEPS = np.array([999.0, 499.0])


def _correct(eps_q, model, step, channel_axis=1):
    """The paper's correction in numpy: ``(eps_q - mu) / (1 + k)``."""
    shape = [1] * eps_q.ndim
    shape[channel_axis] = -1
    return (eps_q - model.bias[step].reshape(shape)) / (1.0 + model.k[step])


def test_the_regression_recovers_the_planted_noise():
    eps, eps_q, k, bias = _planted()
    model = fit_noise(eps, eps_q, timesteps=TIMESTEPS)
    for s in range(2):
        slope = np.polyfit(eps[s].ravel(), (eps_q[s] - eps[s]).ravel(), 1)[0]
        assert model.k[s] == pytest.approx(slope, abs=1e-9)
        assert model.k[s] == pytest.approx(k[s], abs=5e-3)
    np.testing.assert_allclose(model.bias, bias, atol=5e-3)
    np.testing.assert_allclose(model.std, 0.02, rtol=0.05)
    for s in range(2):
        fixed = _correct(eps_q[s], model, s)
        assert np.mean((fixed - eps[s]) ** 2) < 0.1 * np.mean((eps_q[s] - eps[s]) ** 2)
    restored = NoiseModel.from_dict(model.as_dict())
    for name in ("timesteps", "k", "bias", "std"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(model, name))


class Out(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(3, (3, 3), padding=1, name="conv_out")(x)


def test_folding_into_conv_out_is_the_correction_and_keeps_the_codes():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
    params = Out().init(jax.random.key(1), x)["params"]
    eps, eps_q, _, _ = _planted(steps=1)
    model = fit_noise(eps, eps_q, timesteps=TIMESTEPS[:1])
    folded = fold_into_output_layer(params, model)
    out = np.asarray(Out().apply({"params": params}, x))
    got = np.asarray(Out().apply({"params": folded}, x))
    np.testing.assert_allclose(got, _correct(out, model, 0, channel_axis=3), rtol=1e-5, atol=1e-6)
    for symmetric in (False, True):
        before = quantize_weight_codes(params["conv_out"]["kernel"], 4, symmetric=symmetric)[0]
        after = quantize_weight_codes(folded["conv_out"]["kernel"], 4, symmetric=symmetric)[0]
        np.testing.assert_array_equal(np.asarray(before), np.asarray(after))
    with pytest.raises(ValueError, match="one-step"):
        fold_into_output_layer(params, fit_noise(*_planted(steps=2)[:2], timesteps=TIMESTEPS))
