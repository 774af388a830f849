"""PTQD's noise model against numpy: the released rule against the authors' formulas
(ziplab/PTQD analyze_error.py and ddim.py: slope kept only where k > 0, the raw error's
channel bias, the mean of per-sample standard deviations), the pooled rule against our
earlier formula; the regression recovers a planted correlation, channel bias and residual
spread; the correction lowers the error; folded into the output conv it is the same
correction and leaves the weight codes alone (with k = 0 only the bias moves); files without
``fitted_k`` still load; guidance as the authors' sampler collects the errors."""

from __future__ import annotations

from types import SimpleNamespace

import flax.linen as nn
import jax
import numpy as np
import pytest
import scipy.stats as st

from mixdq_jax.deploy.packed import quantize_weight_codes
from mixdq_jax.methods import RECONSTRUCTION_METHODS, get_method
from mixdq_jax.methods.ptqd import PTQDCorrection, guided
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
    model = fit_noise(eps, eps_q, timesteps=TIMESTEPS, rule="pooled")
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
    assert model.k[0] > 0  # the planted slope is positive: the released rule keeps it
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


# ------------------------------------------------------------------------------ the rules
def np_released(eps, eps_q):
    """The authors' statistics, one timestep at a time (ziplab/PTQD): ``linregress`` of the
    flattened error on the flattened float output (analyze_error.py get_kt_dict_imagenet);
    the sampler's ``kt``: the slope if > 0, else 0 (ddim.py); per channel the spatial mean of
    the raw error per sample, averaged over the samples (calculate_t_channel_error); per
    sample ``torch.std`` (unbiased) of ``error - relu(k) * data``, averaged
    (get_t_residualerror_std_dict)."""
    fitted, ks, biases, stds = [], [], [], []
    for e, q in zip(eps, eps_q, strict=True):
        err = q - e
        slope = st.linregress(e.ravel(), err.ravel()).slope
        k = slope if slope > 0 else 0.0
        channels = err.shape[1]
        bias = [np.mean([err[i, c].mean() for i in range(err.shape[0])]) for c in range(channels)]
        per_sample = []
        for i in range(err.shape[0]):
            r = (e[i] + err[i] - (1 + k) * e[i]).ravel()
            per_sample.append(np.sqrt(np.sum((r - r.mean()) ** 2) / (r.size - 1)))
        fitted.append(slope)
        ks.append(k)
        biases.append(bias)
        stds.append(np.mean(per_sample))
    return np.array(fitted), np.array(ks), np.array(biases), np.array(stds)


def np_pooled(eps, eps_q):
    """Our earlier fit: every slope (numpy's polyfit), the residual's channel means, the
    standard deviation of the residual less them over every element of the step."""
    ks, biases, stds = [], [], []
    for e, q in zip(eps, eps_q, strict=True):
        err = q - e
        k = np.polyfit(e.ravel(), err.ravel(), 1)[0]
        residual = err - k * e
        bias = residual.mean(axis=(0, 2, 3))
        ks.append(k)
        biases.append(bias)
        stds.append(np.sqrt(np.mean((residual - bias[None, :, None, None]) ** 2)))
    return np.array(ks), np.array(biases), np.array(stds)


def _both_signs(seed=4):
    """Two steps, the first with a positive correlation, the second negative; float outputs
    with a channel offset, so the raw and residual biases differ."""
    rng = np.random.default_rng(seed)
    eps = rng.normal(size=(2, 5, 3, 6, 6)) + np.array([0.5, -0.3, 0.2])[None, None, :, None, None]
    k = np.array([0.06, -0.04])[:, None, None, None, None]
    bias = rng.normal(size=(2, 1, 3, 1, 1)) * 0.05
    scale = np.array([1.0, 0.5, 2.0, 1.0, 0.7])[None, :, None, None, None]  # uneven spreads
    eps_q = (1 + k) * eps + bias + rng.normal(size=eps.shape) * 0.03 * scale
    return eps, eps_q


def test_the_released_rule_is_the_authors_code():
    eps, eps_q = _both_signs()
    model = fit_noise(eps, eps_q, timesteps=TIMESTEPS)
    fitted, k, bias, std = np_released(eps, eps_q)
    assert fitted[0] > 0 > fitted[1]
    np.testing.assert_allclose(model.fitted_k, fitted, rtol=1e-9)
    np.testing.assert_allclose(model.k, k, rtol=1e-9)
    assert model.k[1] == 0.0  # k <= 0: nothing correlated is applied
    np.testing.assert_allclose(model.bias, bias, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.std, std, rtol=1e-9)
    # not the pooled fit: another bias and spread
    pooled = fit_noise(eps, eps_q, timesteps=TIMESTEPS, rule="pooled")
    assert np.abs(pooled.bias - model.bias).max() > 1e-3
    assert np.abs(pooled.std - model.std).max() > 1e-4
    # a channels-last layout gives the same model
    last = fit_noise(np.moveaxis(eps, 2, -1), np.moveaxis(eps_q, 2, -1), timesteps=TIMESTEPS,
                     channel_axis=3)  # fmt: skip
    np.testing.assert_allclose(last.bias, model.bias, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(last.std, model.std, rtol=1e-9)


def test_the_pooled_rule_is_our_earlier_fit():
    eps, eps_q = _both_signs()
    model = fit_noise(eps, eps_q, timesteps=TIMESTEPS, rule="pooled")
    k, bias, std = np_pooled(eps, eps_q)
    np.testing.assert_allclose(model.k, k, rtol=1e-9)
    assert model.k[1] < 0 and model.fitted_k is None  # every slope applied as fitted
    np.testing.assert_allclose(model.bias, bias, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.std, std, rtol=1e-9)
    with pytest.raises(ValueError, match="rule 'ours' is not one of"):
        fit_noise(eps, eps_q, timesteps=TIMESTEPS, rule="ours")


def test_a_negative_slope_folds_only_the_bias():
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 5))
    params = Out().init(jax.random.key(3), x)["params"]
    eps, eps_q = _both_signs()
    model = fit_noise(eps[1:], eps_q[1:], timesteps=TIMESTEPS[1:])
    assert model.fitted_k[0] < 0 and model.k[0] == 0.0
    folded = fold_into_output_layer(params, model)
    np.testing.assert_array_equal(np.asarray(folded["conv_out"]["kernel"]),
                                  np.asarray(params["conv_out"]["kernel"]))  # fmt: skip
    raw_bias = (eps_q[1] - eps[1]).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(np.asarray(folded["conv_out"]["bias"]),
                               np.asarray(params["conv_out"]["bias"]) - raw_bias,
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_older_files_without_fitted_k_still_load():
    eps, eps_q = _both_signs()
    model = fit_noise(eps, eps_q, timesteps=TIMESTEPS)
    data = model.as_dict()
    assert data["fitted_k"] == model.fitted_k.tolist()
    back = NoiseModel.from_dict(data)
    np.testing.assert_array_equal(back.fitted_k, model.fitted_k)
    old = {name: data[name] for name in ("timesteps", "k", "bias", "std")}  # before the field
    older = NoiseModel.from_dict(old)
    assert older.fitted_k is None and "fitted_k" not in older.as_dict()
    np.testing.assert_array_equal(older.k, model.k)
    with pytest.raises(ValueError, match="must agree"):
        NoiseModel.from_dict({**data, "fitted_k": [0.1]})


def test_guidance_as_the_authors_sampler_collects_the_errors():
    """``e_uncond + s (e_cond - e_uncond)`` per batch, each batch's rows [negative; positive]."""
    rng = np.random.default_rng(5)
    sizes = (2, 3)  # prompts per batch
    outs = [rng.normal(size=(2, 2 * b, 4, 3, 3)) for b in sizes]
    calib = SimpleNamespace(batches=[SimpleNamespace(outputs=o) for o in outs], guidance=5.0)
    got = guided(np.concatenate(outs, axis=1), calib)
    want = np.concatenate([o[:, :b] + 5.0 * (o[:, b:] - o[:, :b]) for o, b in zip(outs, sizes,
                                                                                  strict=True)],
                          axis=1)  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_the_methods_name_their_rule():
    assert PTQDCorrection().rule == "released"
    ptqd = RECONSTRUCTION_METHODS["ptqd"].settings()
    assert ptqd["ptqd"] is True and ptqd["ptqd_rule"] == "released"
    pooled = get_method("ptqd-pooled")
    assert pooled.settings()["ptqd_rule"] == "pooled"
    assert [type(r).__name__ for r in pooled.refiners] == ["BlockReconstruction",
                                                           "PTQDCorrection"]  # fmt: skip
    with pytest.raises(ValueError, match="rule 'x' is not one of"):
        PTQDCorrection(rule="x")
