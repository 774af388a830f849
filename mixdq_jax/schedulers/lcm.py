"""Latent Consistency Model multistep sampler (Luo et al. 2023, Algorithm 1).

Matches diffusers' ``LCMScheduler``: timesteps are a subset of an ``original_inference_steps``
skip schedule; each step maps x_t to the consistency-model estimate
``c_skip * x_t + c_out * x0_pred`` and, except at the last step, re-noises it to the next
timestep with the forward process.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.schedulers.common import (
    Array,
    DiscreteSchedulerConfig,
    SchedulePlan,
    check_choice,
    exact_div,
    step_value,
)

_F32 = np.float32
_SIGMA_DATA = 0.5  # consistency-model boundary condition constant, fixed in diffusers


@dataclass(frozen=True, kw_only=True)
class LCMScheduler(DiscreteSchedulerConfig):
    """Config and pure step functions; see ``mixdq_jax.schedulers.common.Scheduler``.

    ``timestep_spacing`` and ``steps_offset`` are accepted (LCM configs carry them) but, as in
    diffusers, play no part in the LCM timestep schedule.
    """

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    original_inference_steps: int = 50
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    timestep_spacing: str = "leading"
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(type(self).__name__, "thresholding", bool(self.thresholding), (False,))

    def timesteps(
        self, num_inference_steps: int, original_inference_steps: int | None = None
    ) -> np.ndarray:
        """The int timesteps: ``num_inference_steps`` evenly strided picks (from the top) of the
        skip schedule ``k - 1, 2k - 1, ..., T - 1`` with ``k = T // original_inference_steps``."""
        n, t_train = num_inference_steps, self.num_train_timesteps
        original = (
            self.original_inference_steps
            if original_inference_steps is None
            else original_inference_steps
        )
        if original > t_train:
            raise ValueError(
                f"original_inference_steps={original} exceeds num_train_timesteps={t_train}"
            )
        if not 1 <= n <= original:
            raise ValueError(
                f"num_inference_steps={n} must be in [1, original_inference_steps={original}]"
            )
        k = t_train // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        picks = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
        return origin[picks]

    def set_timesteps(
        self, num_inference_steps: int, original_inference_steps: int | None = None
    ) -> SchedulePlan:
        timesteps = self.timesteps(num_inference_steps, original_inference_steps)
        alphas_cumprod = self.alphas_cumprod()
        # the step after the last re-uses the last timestep (its re-noising is never applied)
        prev_timesteps = np.concatenate([timesteps[1:], timesteps[-1:]])
        alpha = alphas_cumprod[timesteps]
        alpha_prev = alphas_cumprod[prev_timesteps]

        # Boundary condition, float32 in diffusers' order: sigma_data^2 / (s^2 + sigma_data^2)
        # and s / sqrt(s^2 + sigma_data^2) with s = t * timestep_scaling.
        scaled = timesteps.astype(_F32) * _F32(self.timestep_scaling)
        denom = scaled * scaled + _F32(_SIGMA_DATA**2)
        steps = {
            "sqrt_alpha": np.sqrt(alpha),
            "sqrt_beta": np.sqrt(_F32(1.0) - alpha),
            "sqrt_alpha_prev": np.sqrt(alpha_prev),
            "sqrt_beta_prev": np.sqrt(_F32(1.0) - alpha_prev),
            "c_skip": (_F32(1.0) / denom) * _F32(_SIGMA_DATA**2),
            "c_out": scaled / np.sqrt(denom),
        }
        return SchedulePlan(
            timesteps=timesteps.astype(np.int32),
            sigmas=None,
            init_noise_sigma=np.asarray(1.0, dtype=_F32),
            steps=steps,
        )

    def output_terms(self, plan: SchedulePlan) -> tuple[np.ndarray, np.ndarray]:
        """Per step, the factors of the model output and of the fresh noise in the next
        latents (``x_next = ... + a * model_output + b * noise``): ``c_out`` times the output's
        factor in ``x0`` (re-noised by ``sqrt_alpha_prev`` but at the last step), and
        ``sqrt_beta_prev`` (0 at the last step). With ``clip_sample`` the step is not affine
        in the output; ``a`` is then its value inside the clipping range."""
        f = {k: np.asarray(v, np.float64) for k, v in plan.steps.items()}
        if self.prediction_type == "epsilon":
            in_x0 = -f["sqrt_beta"] / f["sqrt_alpha"]
        elif self.prediction_type == "sample":
            in_x0 = np.ones_like(f["c_out"])
        else:  # v_prediction
            in_x0 = -f["sqrt_beta"]
        last = np.arange(plan.num_inference_steps) == plan.num_inference_steps - 1
        renoise = np.where(last, 1.0, f["sqrt_alpha_prev"])
        return f["c_out"] * in_x0 * renoise, np.where(last, 0.0, f["sqrt_beta_prev"])

    def init_noise_sigma(self, plan: SchedulePlan) -> Array:
        return plan.init_noise_sigma

    def scale_model_input(self, plan: SchedulePlan, sample: Array, i: Array | int) -> jax.Array:
        """Identity: LCM feeds the UNet the unscaled latents."""
        return jnp.asarray(sample)

    def step(
        self,
        plan: SchedulePlan,
        model_output: Array,
        i: Array | int,
        sample: Array,
        noise: Array | None,
    ) -> jax.Array:
        """x at the next timestep (the denoised estimate at the last step). ``noise`` is
        standard normal shaped like ``sample``; it may be None only for a one-step plan."""
        out_dtype = jnp.asarray(model_output).dtype
        model_output = jnp.asarray(model_output, jnp.float32)
        sample = jnp.asarray(sample, jnp.float32)
        sqrt_alpha = step_value(plan, "sqrt_alpha", i)
        sqrt_beta = step_value(plan, "sqrt_beta", i)
        if self.prediction_type == "epsilon":
            pred_original = exact_div(sample - sqrt_beta * model_output, sqrt_alpha)
        elif self.prediction_type == "sample":
            pred_original = model_output
        else:  # v_prediction
            pred_original = sqrt_alpha * sample - sqrt_beta * model_output
        if self.clip_sample:
            pred_original = jnp.clip(pred_original, -self.clip_sample_range, self.clip_sample_range)
        c_out, c_skip = step_value(plan, "c_out", i), step_value(plan, "c_skip", i)
        denoised = c_out * pred_original + c_skip * sample
        n = plan.num_inference_steps
        if noise is None:
            if n > 1:
                raise ValueError("LCMScheduler.step needs noise for plans with more than one step")
            return denoised.astype(out_dtype)
        noise = jnp.asarray(noise, jnp.float32)
        renoised = (
            step_value(plan, "sqrt_alpha_prev", i) * denoised
            + step_value(plan, "sqrt_beta_prev", i) * noise
        )
        return jnp.where(jnp.asarray(i) == n - 1, denoised, renoised).astype(out_dtype)
