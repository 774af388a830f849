"""Parity of mixdq_jax.schedulers with diffusers 0.42.1 (the independent reference).

Schedules (timesteps, sigmas, init_noise_sigma) and whole sampling loops are compared with the
diffusers scheduler built from the same config dict. Ancestral / LCM noise is fed to diffusers
by replacing ``randn_tensor`` in its scheduler module, so both sides add the same noise.

Note on sigma tolerance: the torch CPU build used as reference here rounds float32 ``sqrt`` to
within 1 ulp instead of correctly (about 20% of inputs differ from IEEE sqrt by 1 ulp), so
sigmas are compared to a few ulp rather than bit for bit. Timesteps are compared exactly.
"""

from __future__ import annotations

import copy
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

from mixdq_jax.schedulers import (
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    from_json,
    make_scheduler,
)

# stabilityai/sdxl-turbo scheduler/scheduler_config.json
SDXL_TURBO = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "trained_betas": None,
}
# SD1.5-style (runwayml scheduler config, keys of PNDM/DDIM included)
SD15 = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
# latent-consistency/lcm-lora-sdv1-5 style
LCM_SD15 = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "clip_sample_range": 1.0,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
}


def _with(base: dict, **changes) -> dict:
    cfg = copy.deepcopy(base)
    cfg.update(changes)
    return cfg


EULER_A = "EulerAncestralDiscreteScheduler"
EULER = "EulerDiscreteScheduler"

CONFIGS = {
    "euler_a-sdxl_turbo": SDXL_TURBO,
    "euler_a-sd15": _with(SD15, _class_name=EULER_A),
    "euler_a-linspace-linear": {"_class_name": EULER_A},
    "euler_a-cosine-v": _with(
        SD15, _class_name=EULER_A, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
    ),
    "euler_a-zero_snr-trailing-v": _with(
        SDXL_TURBO, rescale_betas_zero_snr=True, prediction_type="v_prediction"
    ),
    "euler-sdxl_turbo": _with(SDXL_TURBO, _class_name=EULER),
    "euler-sd15": _with(SD15, _class_name=EULER),
    "euler-linspace-sample": _with(
        SD15, _class_name=EULER, timestep_spacing="linspace", prediction_type="sample"
    ),
    "euler-v-sigma_min": _with(
        SD15, _class_name=EULER, prediction_type="v_prediction", final_sigmas_type="sigma_min"
    ),
    "euler-karras": _with(SD15, _class_name=EULER, use_karras_sigmas=True),
    "euler-exponential-trailing": _with(SDXL_TURBO, _class_name=EULER, use_exponential_sigmas=True),
    "lcm-leading": LCM_SD15,
    "lcm-trailing": _with(LCM_SD15, timestep_spacing="trailing", set_alpha_to_one=False),
    "lcm-v-linear": _with(
        LCM_SD15,
        prediction_type="v_prediction",
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
    ),
    "lcm-sample-clip": _with(LCM_SD15, prediction_type="sample", clip_sample=True),
}
STEPS = (1, 2, 4, 8, 25)
SHAPE = (2, 4, 8, 8)
# float32 ulp is 6e-8 relative; allow a few for the reference's inexact sqrt (module docstring).
SIGMA_RTOL = 5e-7


def _diffusers(config: dict):
    return getattr(diffusers, config["_class_name"]).from_config(config)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_set_timesteps_matches_diffusers(name: str, steps: int) -> None:
    config = CONFIGS[name]
    ours = make_scheduler(config)
    ref = _diffusers(config)
    plan = ours.set_timesteps(steps)
    ref.set_timesteps(steps)

    ref_t = ref.timesteps.numpy()
    if isinstance(ours, LCMScheduler):
        assert np.issubdtype(plan.timesteps.dtype, np.integer)
        np.testing.assert_array_equal(plan.timesteps, ref_t)
        assert plan.sigmas is None
    else:
        assert plan.timesteps.dtype == np.float32
        if config.get("use_karras_sigmas") or config.get("use_exponential_sigmas"):
            # fractional timesteps are derived from the (few-ulp) sigmas
            np.testing.assert_allclose(plan.timesteps, ref_t, rtol=0, atol=1e-4)
        else:
            np.testing.assert_array_equal(plan.timesteps, ref_t)
        ref_sigmas = ref.sigmas.numpy()
        assert plan.sigmas.dtype == np.float32
        assert plan.sigmas.shape == (steps + 1,)
        # zero-SNR rescaling amplifies the reference's sqrt rounding to ~20 ulp
        rtol = 3e-6 if config.get("rescale_betas_zero_snr") else SIGMA_RTOL
        np.testing.assert_allclose(plan.sigmas, ref_sigmas, rtol=rtol, atol=0)
    np.testing.assert_allclose(
        ours.init_noise_sigma(plan), float(ref.init_noise_sigma), rtol=SIGMA_RTOL
    )


def test_lcm_original_inference_steps_override() -> None:
    ref = _diffusers(LCM_SD15)
    ref.set_timesteps(6, original_inference_steps=100)
    plan = make_scheduler(LCM_SD15).set_timesteps(6, original_inference_steps=100)
    np.testing.assert_array_equal(plan.timesteps, ref.timesteps.numpy())


def test_from_json(tmp_path) -> None:
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SDXL_TURBO))
    assert from_json(path) == make_scheduler(SDXL_TURBO)


def test_published_sdxl_turbo_and_lcm_values() -> None:
    """Values from the SDXL-turbo / LCM model cards' pipelines (independent of diffusers)."""
    euler_a = make_scheduler(SDXL_TURBO)
    one = euler_a.set_timesteps(1)
    np.testing.assert_array_equal(one.timesteps, [999.0])
    np.testing.assert_allclose(one.sigmas, [14.614647, 0.0], rtol=1e-6)
    four = euler_a.set_timesteps(4)
    np.testing.assert_array_equal(four.timesteps, [999.0, 749.0, 499.0, 249.0])
    np.testing.assert_allclose(
        four.sigmas, [14.614647, 4.081731, 1.612887, 0.693205, 0.0], rtol=1e-6, atol=1e-6
    )
    lcm = make_scheduler(LCM_SD15)
    np.testing.assert_array_equal(lcm.set_timesteps(4).timesteps, [999, 759, 499, 259])


def _fake_model(x: np.ndarray, t: float) -> np.ndarray:
    """A deterministic stand-in for the UNet: mixes the sample with a t-dependent offset."""
    offset = np.float32(0.002) * np.float32(t) - np.float32(0.5)
    return np.asarray(x, np.float32) * np.float32(0.7) + offset


def _noises(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n + 1, *SHAPE)).astype(np.float32)


def _patch_noise(monkeypatch: pytest.MonkeyPatch, config: dict, queue: list) -> None:
    """Make diffusers' scheduler draw its step noise from ``queue`` (in order)."""

    def fake_randn(shape, generator=None, device=None, dtype=None, layout=None):
        out = torch.from_numpy(queue.pop(0))
        assert tuple(out.shape) == tuple(shape)
        return out.to(dtype or torch.float32)

    module = {
        EULER_A: scheduling_euler_ancestral_discrete,
        "LCMScheduler": scheduling_lcm,
    }.get(config["_class_name"])
    if module is not None:
        monkeypatch.setattr(module, "randn_tensor", fake_randn)


def _diffusers_loop(config: dict, steps: int, noises: np.ndarray, monkeypatch) -> list:
    """Samples after each diffusers step (index 0 is the initial latent)."""
    ref = _diffusers(config)
    ref.set_timesteps(steps)
    queue = [noises[i + 1] for i in range(steps)]
    _patch_noise(monkeypatch, config, queue)
    sample = torch.from_numpy(noises[0]) * ref.init_noise_sigma
    out = [sample.numpy().copy()]
    for t in ref.timesteps:
        scaled = ref.scale_model_input(sample, t)
        model_output = torch.from_numpy(_fake_model(scaled.numpy(), t.item()))
        sample = ref.step(model_output, t, sample).prev_sample
        out.append(sample.numpy().copy())
    return out


def _our_loop(config: dict, steps: int, noises: np.ndarray, jit: bool) -> tuple[list, int]:
    """Our samples after each step, the model on the host as for diffusers; with ``jit`` the
    scheduler functions are compiled once with a traced step index. Returns (samples, traces)."""
    ours = make_scheduler(config)
    plan = ours.set_timesteps(steps)
    traces = []

    def counted(fn):
        def wrapped(*args):
            traces.append(fn.__name__)
            return fn(*args)

        return wrapped

    scale, step = ours.scale_model_input, ours.step
    if jit:
        scale, step = jax.jit(counted(scale)), jax.jit(counted(step))
    sample = jnp.asarray(noises[0]) * ours.init_noise_sigma(plan)
    out = [np.asarray(sample)]
    for i in range(steps):
        index = jnp.int32(i)
        scaled = np.asarray(scale(plan, sample, index))
        model_output = _fake_model(scaled, plan.timesteps[i])
        sample = step(plan, model_output, index, sample, jnp.asarray(noises[i + 1]))
        out.append(np.asarray(sample))
    return out, len(traces)


def _tolerance(config: dict, sample_in: np.ndarray) -> float:
    """1e-5 absolute for latents of the project's schedules (|x| < 64, sigma_max 14.6). Schedules
    with a huge sigma_max (linear betas: 157, zero-SNR: 4096) put latents where one float32 ulp
    exceeds 1e-5; there the bound is 16 ulp of the step's input scale (64 with zero-SNR, whose
    rescaling amplifies the reference's inexact sqrt to ~1e-6 relative error in sigma)."""
    ulps = 64 if config.get("rescale_betas_zero_snr") else 16
    return max(1e-5, ulps * np.finfo(np.float32).eps * float(np.abs(sample_in).max()))


@pytest.mark.parametrize(
    ("steps", "jit"), [(1, True), (1, False), (4, True), (4, False), (8, True)]
)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loop_matches_diffusers(name: str, steps: int, jit: bool, monkeypatch) -> None:
    """Every step's sample matches diffusers'; jitted, one compile serves every step index."""
    config = CONFIGS[name]
    noises = _noises(steps, seed=steps)
    ref = _diffusers_loop(config, steps, noises, monkeypatch)
    ours, traces = _our_loop(config, steps, noises, jit)
    if jit:
        assert traces == 2, "scale_model_input / step recompiled for a new step index"
    worst = worst_rel = 0.0
    for i in range(steps + 1):
        diff = float(np.max(np.abs(ours[i] - ref[i])))
        scale = float(np.abs(ref[max(i - 1, 0)]).max())
        worst, worst_rel = max(worst, diff), max(worst_rel, diff / max(scale, 1.0))
        tol = _tolerance(config, ref[max(i - 1, 0)])
        assert diff <= tol, f"after step {i}: max |ours - diffusers| = {diff:.3g} > {tol:.3g}"
    print(f"{name} steps={steps} jit={jit}: max abs diff {worst:.3g} (rel. to |x| {worst_rel:.3g})")
    if name == "euler_a-sdxl_turbo" and steps == 1 and not jit:
        # op-for-op the same float32 arithmetic: SDXL-turbo's one step is bit-identical
        np.testing.assert_array_equal(ours[1], ref[1])


@pytest.mark.parametrize(
    "name", ["euler_a-sdxl_turbo", "euler-sd15", "lcm-leading", "euler-karras"]
)
def test_fori_loop_matches_diffusers(name: str, monkeypatch) -> None:
    """The whole sampler as one ``lax.fori_loop`` gives diffusers' final sample."""
    config, steps = CONFIGS[name], 4
    noises = _noises(steps, seed=11)
    ref = _diffusers_loop(config, steps, noises, monkeypatch)
    ours = make_scheduler(config)
    plan = ours.set_timesteps(steps)

    @jax.jit
    def sample_loop(plan, noises):
        def body(i, x):
            scaled = ours.scale_model_input(plan, x, i)
            t = plan.timesteps[i].astype(jnp.float32)
            model_output = scaled * jnp.float32(0.7) + (jnp.float32(0.002) * t - jnp.float32(0.5))
            return ours.step(plan, model_output, i, x, noises[i + 1])

        x0 = noises[0] * ours.init_noise_sigma(plan)
        return jax.lax.fori_loop(0, plan.timesteps.shape[0], body, x0)

    final = np.asarray(sample_loop(plan, jnp.asarray(noises)))
    diff = float(np.abs(final - ref[-1]).max())
    print(f"{name} fori_loop steps={steps}: max abs diff {diff:.3g}")
    assert diff <= 1e-5


def test_single_step_without_noise() -> None:
    """SDXL-turbo's 1-step sampling needs no noise (sigma_up of the last step is 0)."""
    for config in (SDXL_TURBO, LCM_SD15):
        ours = make_scheduler(config)
        one = ours.set_timesteps(1)
        x = jnp.asarray(_noises(1)[0])
        model_output = jnp.asarray(_fake_model(np.asarray(x), 999.0))
        assert ours.step(one, model_output, 0, x, None).shape == x.shape
        with pytest.raises(ValueError, match="noise"):
            ours.step(ours.set_timesteps(2), model_output, 0, x, None)
    euler = make_scheduler(CONFIGS["euler-sd15"])  # deterministic: noise may always be None
    x = jnp.asarray(_noises(1)[0])
    assert euler.step(euler.set_timesteps(2), x, 0, x, None).shape == x.shape


def test_plan_is_a_pytree() -> None:
    plan = make_scheduler(SDXL_TURBO).set_timesteps(4)
    leaves = jax.tree_util.tree_leaves(plan)
    assert any(leaf is plan.timesteps for leaf in leaves)
    assert plan.num_inference_steps == 4


def test_bad_configs() -> None:
    with pytest.raises(ValueError, match="DDIMScheduler"):
        make_scheduler({"_class_name": "DDIMScheduler"})
    with pytest.raises(ValueError, match="EulerAncestralDiscreteScheduler"):
        make_scheduler({"_class_name": "DDIMScheduler"})  # lists the supported ones
    with pytest.raises(ValueError, match="None"):
        make_scheduler({"beta_schedule": "linear"})
    with pytest.raises(ValueError, match="'x_prediction'"):
        make_scheduler(_with(SDXL_TURBO, prediction_type="x_prediction"))
    with pytest.raises(ValueError, match="'sample'"):  # diffusers' Euler-A has no "sample"
        make_scheduler(_with(SDXL_TURBO, prediction_type="sample"))
    with pytest.raises(ValueError, match="'sigmoid'"):
        make_scheduler(_with(SDXL_TURBO, beta_schedule="sigmoid"))
    with pytest.raises(ValueError, match="'uniform'"):
        make_scheduler(_with(LCM_SD15, timestep_spacing="uniform"))
    with pytest.raises(ValueError, match="'log_linear'"):
        make_scheduler(_with(SD15, _class_name=EULER, interpolation_type="log_linear"))
    with pytest.raises(ValueError, match="thresholding"):
        make_scheduler(_with(LCM_SD15, thresholding=True))
    with pytest.raises(ValueError, match="skip_prk_steps"):
        make_scheduler(SDXL_TURBO, strict=True)
    with pytest.raises(ValueError, match="original_inference_steps"):
        make_scheduler(LCM_SD15).set_timesteps(51)


def test_schedulers_are_hashable_configs() -> None:
    """Frozen configs: usable as static jit arguments and equal when built from equal dicts."""
    a, b = make_scheduler(SDXL_TURBO), make_scheduler(dict(SDXL_TURBO))
    assert a == b and hash(a) == hash(b)
    assert isinstance(a, EulerAncestralDiscreteScheduler)
    assert isinstance(make_scheduler(CONFIGS["euler-sd15"]), EulerDiscreteScheduler)
