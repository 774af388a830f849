"""Euler ancestral sampler (Karras et al. 2022, k-diffusion's ``sample_euler_ancestral``).

The scheduler SDXL-turbo ships with. Matches diffusers' ``EulerAncestralDiscreteScheduler``:
each step takes a deterministic Euler step down to ``sigma_down`` and then adds fresh noise of
scale ``sigma_up`` so that the marginal noise level lands on the next sigma.
"""

from __future__ import annotations

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
    euler_init_noise_sigma,
    exact_div,
    interp_sigmas,
    sigma_alphas_cumprod,
    spaced_timesteps,
    step_value,
    train_sigmas,
)
from mixdq_jax.schedulers.euler import euler_output_coefficient

_F32 = np.float32


@dataclass(frozen=True, kw_only=True)
class EulerAncestralDiscreteScheduler(SigmaInputScaling, DiscreteSchedulerConfig):
    """Config and pure step functions; see ``mixdq_jax.schedulers.common.Scheduler``."""

    # diffusers refuses "sample" only when stepping; we reject it when the config is read.
    supported_prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction")

    def set_timesteps(self, num_inference_steps: int) -> SchedulePlan:
        timesteps = spaced_timesteps(
            self.timestep_spacing, self.num_train_timesteps, num_inference_steps, self.steps_offset
        )
        sigmas_train = train_sigmas(sigma_alphas_cumprod(self))
        sigmas = np.concatenate([interp_sigmas(timesteps, sigmas_train), [0.0]]).astype(_F32)

        # Per-step scalars in float32, in the operation order of diffusers' step().
        sigma_from, sigma_to = sigmas[:-1], sigmas[1:]
        sq_from, sq_to = sigma_from * sigma_from, sigma_to * sigma_to
        sigma_up = np.sqrt(sq_to * (sq_from - sq_to) / sq_from)
        sigma_down = np.sqrt(sq_to - sigma_up * sigma_up)
        steps = {
            "sigma": sigma_from,
            "input_scale": np.sqrt(sq_from + _F32(1.0)),
            "dt": sigma_down - sigma_from,
            "sigma_up": sigma_up,
            "v_out": -sigma_from / np.sqrt(sq_from + _F32(1.0)),
            "v_in": sq_from + _F32(1.0),
        }
        return SchedulePlan(
            timesteps=timesteps,
            sigmas=sigmas,
            init_noise_sigma=euler_init_noise_sigma(sigmas, self.timestep_spacing),
            steps=steps,
        )

    def output_terms(self, plan: SchedulePlan) -> tuple[np.ndarray, np.ndarray]:
        """Per step, the factors of the model output and of the fresh noise in the next
        latents (``x_next = ... + a * model_output + b * noise``): Euler's and ``sigma_up``."""
        return euler_output_coefficient(self.prediction_type, plan), np.asarray(
            plan.steps["sigma_up"], np.float64
        )

    def step(
        self,
        plan: SchedulePlan,
        model_output: Array,
        i: Array | int,
        sample: Array,
        noise: Array | None,
    ) -> jax.Array:
        """x_{i+1} from x_i. ``noise`` is standard normal, shaped like ``sample``; it may be None
        only for a one-step plan (the last step adds no noise)."""
        out_dtype = jnp.asarray(model_output).dtype
        model_output = jnp.asarray(model_output, jnp.float32)
        sample = jnp.asarray(sample, jnp.float32)
        sigma = step_value(plan, "sigma", i)
        if self.prediction_type == "epsilon":
            pred_original = sample - sigma * model_output
        else:  # v_prediction
            pred_original = model_output * step_value(plan, "v_out", i) + exact_div(
                sample, step_value(plan, "v_in", i)
            )
        derivative = exact_div(sample - pred_original, sigma)
        prev = sample + derivative * step_value(plan, "dt", i)
        if noise is None:
            if plan.num_inference_steps > 1:
                raise ValueError(
                    "EulerAncestralDiscreteScheduler.step needs noise for plans with more than "
                    "one step"
                )
        else:
            prev = prev + jnp.asarray(noise, jnp.float32) * step_value(plan, "sigma_up", i)
        return prev.astype(out_dtype)
