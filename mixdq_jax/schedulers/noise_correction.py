"""PTQD's correction of a quantized UNet's output noise, applied inside the sampling loop.

PTQD (He et al. 2023) models the quantized noise prediction as ``eps_q = (1 + k) eps + D'``,
per sampling step: ``k`` from a regression of the output error on the float output, a
channel-wise ``bias`` and the residual ``D'``'s standard deviation ``std``
(`mixdq_jax.reconstruction.ptqd.fit_noise` fits them, by PTQD's released rules or our pooled
ones: which error the bias averages, which slopes apply). In the loop each step then

- undoes the correlated part and the bias: ``eps_hat = (eps_q - bias) / (1 + k)``
  (after classifier-free guidance: the map is affine with a unit weight sum, so guiding the
  corrected halves gives the same);
- lets a stochastic step absorb the residual's variance (PTQD's variance schedule
  calibration): the model output enters the next latents with a factor ``a`` and fresh noise
  with ``b`` (the scheduler's ``output_terms``), so the carried residual adds variance
  ``a^2 std^2 / (1 + k)^2`` and the fresh noise is scaled to
  ``sqrt(max(b^2 - a^2 std^2 / (1 + k)^2, 0))``. A deterministic step (``b = 0``) or the
  last step only takes the first part.

The model is fitted on one schedule: its ``timesteps`` must be the plan's, else
:meth:`NoiseModel.for_plan` says which to use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.schedulers.common import SchedulePlan, Scheduler


@dataclass(frozen=True, kw_only=True)
class NoiseModel:
    """Per sampling step of the schedule ``timesteps`` ``[N]``: the applied slope ``k``
    ``[N]``, the channel means ``bias`` ``[N, C]`` the loop subtracts and the residual's
    standard deviation ``std`` ``[N]``. ``fitted_k`` ``[N]``: the regression's slope where the
    fit's rule applied another (PTQD's released code keeps only ``k > 0``); ``None`` where
    ``k`` is the fitted slope, as in files written before the field existed."""

    timesteps: np.ndarray
    k: np.ndarray
    bias: np.ndarray
    std: np.ndarray
    fitted_k: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = np.shape(self.timesteps)[0] if np.ndim(self.timesteps) == 1 else -1
        shapes = {name: np.shape(getattr(self, name)) for name in ("k", "bias", "std")}
        if self.fitted_k is not None:
            shapes["fitted_k"] = np.shape(self.fitted_k)
        bias_ok = len(shapes["bias"]) == 2 and shapes["bias"][0] == n
        vectors_ok = all(shapes[name] == (n,) for name in shapes if name != "bias")
        if n < 1 or not vectors_ok or not bias_ok:
            raise ValueError(
                f"NoiseModel: timesteps [N], k [N], bias [N, C], std [N] (and fitted_k [N]) "
                "must agree, got "
                f"timesteps {np.shape(self.timesteps)}, "
                + ", ".join(f"{k} {v}" for k, v in shapes.items())
            )
        if np.any(np.asarray(self.k) <= -1.0):
            raise ValueError(f"NoiseModel: 1 + k must be positive, got k = {self.k}")

    @property
    def steps(self) -> int:
        return int(np.shape(self.timesteps)[0])

    def as_dict(self) -> dict[str, Any]:
        """JSON-able (the exported folder's metadata keeps it); ``fitted_k`` only when set,
        so readers of the four fields read it unchanged."""
        names = _FIELDS if self.fitted_k is None else (*_FIELDS, "fitted_k")
        return {name: np.asarray(getattr(self, name)).tolist() for name in names}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, what: str = "noise model") -> NoiseModel:
        """Files with or without ``fitted_k`` (older ones have none)."""
        missing = [name for name in _FIELDS if name not in data]
        if missing:
            raise ValueError(f"{what}: missing field(s) {missing}")
        try:
            names = [name for name in (*_FIELDS, "fitted_k") if data.get(name) is not None]
            arrays = {name: np.asarray(data[name], np.float64) for name in names}
            return cls(**arrays)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: {e}") from None

    def for_plan(self, scheduler: Scheduler, plan: SchedulePlan) -> StepCorrection:
        """The per-step arrays the sampling loop applies on ``plan`` (``scheduler``'s)."""
        fitted = np.asarray(self.timesteps, np.float64)
        planned = np.asarray(plan.timesteps, np.float64)
        if fitted.shape != planned.shape or not np.allclose(fitted, planned, atol=1e-3):
            raise ValueError(
                f"this model's PTQD noise correction was fitted for {self.steps} sampling "
                f"step(s) at timesteps {fitted.tolist()}; the sampler runs "
                f"{planned.shape[0]} at {planned.tolist()}: sample with the same steps and "
                "scheduler, or quantize again for this schedule"
            )
        coeff, noise_std = scheduler.output_terms(plan)
        inv = 1.0 / (1.0 + np.asarray(self.k, np.float64))
        carried = (coeff * np.asarray(self.std) * inv) ** 2
        reduced = np.sqrt(np.maximum(noise_std**2 - carried, 0.0))
        noise_scale = np.where(noise_std > 0, reduced / np.where(noise_std > 0, noise_std, 1), 1)
        return StepCorrection(
            scale=jnp.asarray(inv, jnp.float32),
            bias=jnp.asarray(self.bias, jnp.float32),
            noise_scale=jnp.asarray(noise_scale, jnp.float32),
        )


_FIELDS = ("timesteps", "k", "bias", "std")


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class StepCorrection:
    """What the loop applies at step ``i``: ``(out - bias[i]) * scale[i]`` to the (guided)
    model output and ``noise_scale[i]`` to the fresh noise. A pytree of ``[N]``/``[N, C]``."""

    scale: jax.Array
    bias: jax.Array
    noise_scale: jax.Array

    def output(self, out: jax.Array, i: jax.Array | int) -> jax.Array:
        """The corrected NCHW model output of step ``i``."""
        bias = self.bias[i].astype(out.dtype).reshape(1, -1, *([1] * (out.ndim - 2)))
        return (out - bias) * self.scale[i].astype(out.dtype)

    def noise(self, noise: jax.Array, i: jax.Array | int) -> jax.Array:
        return noise * self.noise_scale[i].astype(noise.dtype)
