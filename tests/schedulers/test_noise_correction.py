"""PTQD's correction in the sampling loop: each scheduler's ``output_terms`` are the factors of
the model output and of the fresh noise in diffusers' own step (measured on diffusers'
schedulers), and the per-step arrays follow PTQD's formulas (computed here in numpy)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from mixdq_jax.schedulers import make_scheduler
from mixdq_jax.schedulers.noise_correction import NoiseModel
from tests.schedulers.test_schedulers import CONFIGS, _diffusers

MODULES = {
    "EulerAncestralDiscreteScheduler": "scheduling_euler_ancestral_discrete",
    "EulerDiscreteScheduler": "scheduling_euler_discrete",
    "LCMScheduler": "scheduling_lcm",
}
SHAPE = (1, 4, 2, 2)


def _run(config, steps, out_value, noise_value, monkeypatch):
    """diffusers' next latents at every step from ``sample = 0`` with a constant model output
    and constant "random" noise."""
    module = importlib.import_module(f"diffusers.schedulers.{MODULES[config['_class_name']]}")
    monkeypatch.setattr(
        module, "randn_tensor", lambda shape, **kw: torch.full(tuple(shape), float(noise_value))
    )
    ref = _diffusers(config)
    ref.set_timesteps(steps)
    values = []
    for t in ref.timesteps:
        sample = torch.zeros(SHAPE)
        out = ref.step(torch.full(SHAPE, float(out_value)), t, sample).prev_sample
        values.append(float(out.flatten()[0]))
    return np.asarray(values)


@pytest.mark.parametrize("steps", (1, 2, 4))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_terms_are_the_factors_in_diffusers_step(name, steps, monkeypatch):
    config = CONFIGS[name]
    ours = make_scheduler(config)
    coeff, noise_std = ours.output_terms(ours.set_timesteps(steps))
    base = _run(config, steps, 0.0, 0.0, monkeypatch)  # every step is affine: 0 at 0
    np.testing.assert_allclose(base, 0.0, atol=1e-6)
    delta = 0.5  # inside LCM's clip range
    from_output = (_run(config, steps, delta, 0.0, monkeypatch) - base) / delta
    from_noise = _run(config, steps, 0.0, 1.0, monkeypatch) - base
    np.testing.assert_allclose(coeff, from_output, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(noise_std, from_noise, rtol=2e-5, atol=1e-6)
    assert noise_std[-1] == 0.0  # the last step adds no noise


def _model(steps=3, channels=4):
    rng = np.random.default_rng(0)
    return NoiseModel(
        timesteps=np.asarray(make_scheduler(CONFIGS["euler_a-sdxl_turbo"])
                             .set_timesteps(steps).timesteps, np.float64),
        k=np.array([0.05, -0.02, 0.1])[:steps], bias=rng.normal(size=(steps, channels)) * 0.01,
        std=np.array([0.03, 2.0, 0.05])[:steps],
    )  # fmt: skip


def test_the_step_arrays_follow_ptqds_formulas():
    scheduler = make_scheduler(CONFIGS["euler_a-sdxl_turbo"])
    plan = scheduler.set_timesteps(3)
    model = _model()
    corr = model.for_plan(scheduler, plan)
    sig = np.asarray(plan.sigmas, np.float64)
    up = np.sqrt(sig[1:] ** 2 * (sig[:-1] ** 2 - sig[1:] ** 2) / sig[:-1] ** 2)
    down = np.sqrt(sig[1:] ** 2 - up**2)
    for i in range(3):
        carried = ((down[i] - sig[i]) * model.std[i] / (1 + model.k[i])) ** 2
        want = np.sqrt(max(up[i] ** 2 - carried, 0.0)) / up[i] if up[i] > 0 else 1.0
        assert float(corr.noise_scale[i]) == pytest.approx(want, rel=1e-5)
        assert float(corr.scale[i]) == pytest.approx(1 / (1 + model.k[i]), rel=1e-6)
    # step 1 carries more than the fresh noise: none is added; the last step adds none anyway
    assert float(corr.noise_scale[1]) == 0.0 and 0.0 < float(corr.noise_scale[0]) < 1.0
    eps = np.random.default_rng(1).normal(size=(2, 4, 3, 3)).astype(np.float32)
    got = np.asarray(corr.output(eps, 2))
    want = (eps - model.bias[2][None, :, None, None]) / (1 + model.k[2])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_another_schedule_is_refused_with_the_one_it_was_fitted_for():
    scheduler = make_scheduler(CONFIGS["euler_a-sdxl_turbo"])
    with pytest.raises(ValueError, match=r"fitted for 3 sampling step\(s\).*runs 2"):
        _model().for_plan(scheduler, scheduler.set_timesteps(2))
    lcm = make_scheduler(CONFIGS["lcm-leading"])
    with pytest.raises(ValueError, match="same steps and scheduler"):
        _model().for_plan(lcm, lcm.set_timesteps(3))


def test_a_stored_model_round_trips_and_bad_ones_are_named():
    model = _model()
    back = NoiseModel.from_dict(model.as_dict())
    for name in ("timesteps", "k", "bias", "std"):
        np.testing.assert_array_equal(getattr(back, name), getattr(model, name))
    data = model.as_dict()
    with pytest.raises(ValueError, match=r"noise_model: missing field\(s\) \['std'\]"):
        NoiseModel.from_dict({k: v for k, v in data.items() if k != "std"}, what="noise_model")
    with pytest.raises(ValueError, match="must agree"):
        NoiseModel.from_dict({**data, "k": [0.1]})
    with pytest.raises(ValueError, match="1 \\+ k must be positive"):
        NoiseModel.from_dict({**data, "k": [0.1, -1.0, 0.0]})
