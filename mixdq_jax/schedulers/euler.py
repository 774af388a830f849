"""Deterministic Euler sampler (Karras et al. 2022, Algorithm 2 without churn).

Matches diffusers' ``EulerDiscreteScheduler`` with ``s_churn = 0`` (its default), linear sigma
interpolation, discrete timesteps, and optional Karras or exponential sigma spacing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.schedulers.common import (
    Array,
    DiscreteSchedulerConfig,
    SchedulePlan,
    SigmaInputScaling,
    check_choice,
    euler_init_noise_sigma,
    exact_div,
    interp_sigmas,
    sigma_alphas_cumprod,
    spaced_timesteps,
    step_value,
    train_sigmas,
)

_F32 = np.float32
_KARRAS_RHO = 7.0  # the paper's value, as in diffusers


@dataclass(frozen=True, kw_only=True)
class EulerDiscreteScheduler(SigmaInputScaling, DiscreteSchedulerConfig):
    """Config and pure step functions; see ``mixdq_jax.schedulers.common.Scheduler``."""

    supported_prediction_types: ClassVar[tuple[str, ...]] = (
        "epsilon",
        "v_prediction",
        "sample",
        "original_sample",
    )

    interpolation_type: str = "linear"
    use_karras_sigmas: bool | None = False
    use_exponential_sigmas: bool | None = False
    use_beta_sigmas: bool | None = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_type: str = "discrete"
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "interpolation_type", self.interpolation_type, ("linear",))
        check_choice(owner, "timestep_type", self.timestep_type, ("discrete",))
        check_choice(owner, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))
        check_choice(owner, "use_beta_sigmas", bool(self.use_beta_sigmas), (False,))
        if bool(self.use_karras_sigmas) and bool(self.use_exponential_sigmas):
            raise ValueError(
                f"{owner}: only one of use_karras_sigmas / use_exponential_sigmas can be set"
            )

    def set_timesteps(self, num_inference_steps: int) -> SchedulePlan:
        timesteps = spaced_timesteps(
            self.timestep_spacing, self.num_train_timesteps, num_inference_steps, self.steps_offset
        )
        alphas_cumprod = sigma_alphas_cumprod(self)
        sigmas_train = train_sigmas(alphas_cumprod)
        sigmas = interp_sigmas(timesteps, sigmas_train)  # float64
        if self.use_karras_sigmas or self.use_exponential_sigmas:
            lo = self.sigma_min if self.sigma_min is not None else sigmas[-1].item()
            hi = self.sigma_max if self.sigma_max is not None else sigmas[0].item()
            if self.use_karras_sigmas:
                sigmas = _karras_sigmas(lo, hi, num_inference_steps)
            else:
                sigmas = np.exp(np.linspace(math.log(hi), math.log(lo), num_inference_steps))
            timesteps = _sigma_to_t(sigmas, np.log(sigmas_train)).astype(_F32)
        last = sigmas_train[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(_F32)

        sigma = sigmas[:-1]
        sq = sigma * sigma
        steps = {
            "sigma": sigma,
            "input_scale": np.sqrt(sq + _F32(1.0)),
            "dt": sigmas[1:] - sigma,
            "v_out": -sigma / np.sqrt(sq + _F32(1.0)),
            "v_in": sq + _F32(1.0),
        }
        return SchedulePlan(
            timesteps=timesteps.astype(_F32),
            sigmas=sigmas,
            init_noise_sigma=euler_init_noise_sigma(sigmas, self.timestep_spacing),
            steps=steps,
        )

    def output_terms(self, plan: SchedulePlan) -> tuple[np.ndarray, np.ndarray]:
        """Per step, the factors of the model output and of the fresh noise in the next
        latents (``x_next = ... + a * model_output + b * noise``); deterministic: ``b = 0``."""
        return euler_output_coefficient(self.prediction_type, plan), np.zeros_like(
            np.asarray(plan.steps["dt"], np.float64)
        )

    def step(
        self,
        plan: SchedulePlan,
        model_output: Array,
        i: Array | int,
        sample: Array,
        noise: Array | None = None,
    ) -> jax.Array:
        """x_{i+1} from x_i (deterministic: ``noise`` is ignored)."""
        del noise
        out_dtype = jnp.asarray(model_output).dtype
        model_output = jnp.asarray(model_output, jnp.float32)
        sample = jnp.asarray(sample, jnp.float32)
        sigma = step_value(plan, "sigma", i)
        if self.prediction_type == "epsilon":
            pred_original = sample - sigma * model_output
        elif self.prediction_type == "v_prediction":
            pred_original = model_output * step_value(plan, "v_out", i) + exact_div(
                sample, step_value(plan, "v_in", i)
            )
        else:  # "sample" / "original_sample"
            pred_original = model_output
        derivative = exact_div(sample - pred_original, sigma)
        prev = sample + derivative * step_value(plan, "dt", i)
        return prev.astype(out_dtype)


def euler_output_coefficient(prediction_type: str, plan: SchedulePlan) -> np.ndarray:
    """The model output's factor in an Euler step ``x + dt (x - x0(out)) / sigma``, per step:
    ``dt`` for epsilon, ``-v_out dt / sigma`` for v, ``-dt / sigma`` for a sample prediction."""
    dt = np.asarray(plan.steps["dt"], np.float64)
    sigma = np.asarray(plan.steps["sigma"], np.float64)
    if prediction_type == "epsilon":
        return dt
    if prediction_type == "v_prediction":
        return -np.asarray(plan.steps["v_out"], np.float64) * dt / sigma
    return -dt / sigma


def _karras_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Karras et al. (2022) eq. 5: uniform steps in sigma^(1/rho), float64."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / _KARRAS_RHO), sigma_max ** (1 / _KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** _KARRAS_RHO


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: linear interpolation in log-sigma between the
    two neighbouring training sigmas (``log_sigmas`` ascending, float32)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    # index of the last training log-sigma <= log_sigma, kept inside [0, len - 2]
    below = (log_sigma[None, :] - log_sigmas[:, None]) >= 0
    low_idx = np.clip(below.sum(axis=0) - 1, 0, len(log_sigmas) - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx
