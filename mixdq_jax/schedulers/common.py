"""Shared pieces of the discrete-time schedulers: config parsing, beta schedules, timestep spacing.

Schedules are built on the host with numpy, reproducing the float32/float64 arithmetic of
diffusers 0.42.1 (which builds them with torch on CPU) operation by operation: timesteps agree
exactly, sigmas bit for bit wherever torch's float32 sqrt is correctly rounded (some CPU builds
are 1 ulp off). The per-step work is pure ``jax.numpy`` indexed by a (possibly traced) step
number, so a whole sampling loop fits in one ``jax.lax.fori_loop``; run op by op it repeats
diffusers' float32 arithmetic, and under ``jit`` XLA may fuse multiply-adds (ulp-level changes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array | np.ndarray

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")

_F32 = np.float32


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class SchedulePlan:
    """The outcome of ``set_timesteps``: everything a sampling loop indexes by step number.

    A pytree (all fields are data), so it can be passed into ``jax.jit`` or closed over.
    ``steps`` maps a name to a per-step constant of shape [N], precomputed on the host in the
    same precision and operation order as diffusers so the traced step only does array math.
    """

    timesteps: Array  # [N] the values handed to the UNet (float32 for Euler, int32 for LCM)
    sigmas: Array | None  # [N + 1] for sigma-parameterised schedulers, else None
    init_noise_sigma: Array  # 0-d float32: initial latents are scaled by this
    steps: Mapping[str, Array]  # per-step constants, each [N]

    @property
    def num_inference_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])


class Scheduler(Protocol):
    """What a pipeline needs from a scheduler; every method is pure and jit-friendly."""

    def set_timesteps(self, num_inference_steps: int) -> SchedulePlan: ...

    def init_noise_sigma(self, plan: SchedulePlan) -> Array: ...

    def scale_model_input(self, plan: SchedulePlan, sample: Array, i: Array | int) -> Array: ...

    def step(
        self,
        plan: SchedulePlan,
        model_output: Array,
        i: Array | int,
        sample: Array,
        noise: Array | None,
    ) -> Array: ...

    def output_terms(self, plan: SchedulePlan) -> tuple[np.ndarray, np.ndarray]: ...


def step_value(plan: SchedulePlan, name: str, i: Array | int) -> jax.Array:
    """Per-step constant ``name`` at step ``i`` (``i`` may be a tracer)."""
    return jnp.asarray(plan.steps[name])[i]


def exact_div(numerator: jax.Array, scalar: jax.Array) -> jax.Array:
    """``numerator / scalar`` rounded like torch's elementwise division.

    XLA's algebraic simplifier rewrites ``x / broadcast(c)`` into ``x * (1 / c)``, which is off
    by an ulp on about a third of the elements; near-cancelling Euler steps on latents of size
    ~50 turn that into 1e-5 differences. Hiding the broadcast behind an optimization barrier
    keeps a true divide (the barrier itself compiles away; the divide stays fused).
    """
    denom = jax.lax.optimization_barrier(jnp.broadcast_to(scalar, numerator.shape))
    return numerator / denom


def check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(
            f"{owner}: unsupported {name}={value!r}; supported: {', '.join(map(repr, allowed))}"
        )


@dataclass(frozen=True, kw_only=True)
class DiscreteSchedulerConfig:
    """Options shared by the discrete-time schedulers (names and defaults as in diffusers).

    Subclasses add their own options. ``from_config`` ignores keys the scheduler does not take,
    as diffusers does (pipeline configs carry options of other scheduler classes), but every
    value of a taken key is validated in ``__post_init__``.
    """

    supported_prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.trained_betas is None:
            check_choice(owner, "beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        else:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(
                    f"{owner}: trained_betas has {len(self.trained_betas)} values, "
                    f"num_train_timesteps is {self.num_train_timesteps}"
                )
        check_choice(owner, "timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice(
            owner, "prediction_type", self.prediction_type, self.supported_prediction_types
        )
        if self.num_train_timesteps < 2:
            raise ValueError(f"{owner}: num_train_timesteps must be >= 2")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, strict: bool = False) -> Self:
        """Build from a diffusers ``scheduler_config.json`` dict.

        ``_``-keys are metadata. Other keys this scheduler does not take are ignored like
        diffusers does (``strict=True`` rejects them instead, to catch typos).
        """
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        foreign = sorted(k for k in config if k not in names and not k.startswith("_"))
        if strict and foreign:
            raise ValueError(f"{cls.__name__}: unknown config keys {foreign}")
        kwargs = {k: v for k, v in config.items() if k in names}
        if kwargs.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(kwargs["trained_betas"])
        return cls(**kwargs)

    def betas(self) -> np.ndarray:
        """float32 betas [num_train_timesteps], as diffusers builds them with torch."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, dtype=_F32)
        elif self.beta_schedule == "linear":
            betas = linspace_f32(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":
            root = linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n)
            betas = root * root
        else:  # squaredcos_cap_v2
            betas = squaredcos_cap_v2_betas(n)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return betas

    def alphas_cumprod(self) -> np.ndarray:
        """float32 cumulative product of (1 - beta)."""
        return cumprod_f32(_F32(1.0) - self.betas())


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` on an x86 CPU, bit for bit.

    torch computes ``step = (end - start) / (n - 1)`` in float32 and fills the first half as
    ``start + step * i`` and the second as ``end - step * (n - 1 - i)``, each with one fused
    multiply-add (one rounding). The float64 product of a float32 step and an integer below
    2**29 is exact, so a float64 add followed by a float32 cast emulates the fma (up to a
    double-rounding tie, which does not occur for the schedules here: the tests check).
    """
    if n == 1:
        return np.asarray([start], dtype=_F32)
    s, e = _F32(start), _F32(end)
    step = np.float64((e - s) / _F32(n - 1))
    idx = np.arange(n, dtype=np.float64)
    head = np.float64(s) + step * idx
    tail = np.float64(e) - step * (n - 1 - idx)
    return np.where(idx < n // 2, head, tail).astype(_F32)


def cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch's CPU float32 cumprod: accumulates in float64, rounds each output to float32."""
    return np.cumprod(x.astype(np.float64)).astype(_F32)


def squaredcos_cap_v2_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal), in Python floats then cast to float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(betas, dtype=np.float64).astype(_F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale float32 betas to zero terminal SNR (Lin et al. 2023, Algorithm 1)."""
    root = np.sqrt(cumprod_f32(_F32(1.0) - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alphas_bar = root * root
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (_F32(1.0) - alphas).astype(_F32)


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_inference_steps: int, steps_offset: int
) -> np.ndarray:
    """Descending float32 timesteps of the Euler-family ``set_timesteps`` (Lin et al. 2023,
    Table 2: ``linspace``, ``leading``, ``trailing``)."""
    n, t_train = num_inference_steps, num_train_timesteps
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")
    if spacing == "linspace":
        return np.linspace(0, t_train - 1, n, dtype=_F32)[::-1].copy()
    if spacing == "leading":
        ratio = t_train // n
        ts = (np.arange(0, n) * ratio).round()[::-1].astype(_F32)
        return ts + _F32(steps_offset)
    if spacing == "trailing":
        ts = np.arange(t_train, 0, -(t_train / n)).round().astype(_F32)
        return ts - _F32(1)
    raise ValueError(f"unsupported timestep_spacing={spacing!r}; supported: {TIMESTEP_SPACINGS}")


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """float32 sqrt((1 - a) / a) per training timestep (ascending in t)."""
    return np.sqrt((_F32(1.0) - alphas_cumprod) / alphas_cumprod)


def sigma_alphas_cumprod(config: DiscreteSchedulerConfig) -> np.ndarray:
    """alphas_cumprod as the sigma-parameterised (Euler) schedulers hold it: with zero-SNR
    rescaling the last entry is 2**-24 instead of 0, so its sigma stays finite."""
    ac = config.alphas_cumprod()
    if config.rescale_betas_zero_snr:
        ac[-1] = _F32(2.0**-24)
    return ac


def interp_sigmas(timesteps: np.ndarray, sigmas_train: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps by linear interpolation, in float64."""
    return np.interp(timesteps, np.arange(0, len(sigmas_train)), sigmas_train)


def euler_init_noise_sigma(sigmas: np.ndarray, timestep_spacing: str) -> np.ndarray:
    """Scale of the initial latents: sigma_max, or sqrt(sigma_max^2 + 1) for ``leading``."""
    top = sigmas.max()
    if timestep_spacing in ("linspace", "trailing"):
        return np.asarray(top, dtype=_F32)
    return np.asarray(np.sqrt(top * top + _F32(1.0)), dtype=_F32)


class SigmaInputScaling:
    """What Euler-type schedulers share: ``init_noise_sigma`` and ``x / sqrt(sigma^2 + 1)``
    input scaling, both read from the plan (``plan.steps["input_scale"]``)."""

    def init_noise_sigma(self, plan: SchedulePlan) -> Array:
        return plan.init_noise_sigma

    def scale_model_input(self, plan: SchedulePlan, sample: Array, i: Array | int) -> jax.Array:
        """``sample / sqrt(sigma_i^2 + 1)``: the UNet sees unit-variance inputs."""
        sample = jnp.asarray(sample)
        return exact_div(sample, step_value(plan, "input_scale", i)).astype(sample.dtype)
