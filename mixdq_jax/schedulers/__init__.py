"""Diffusion schedulers as frozen configs with pure, jit-friendly step functions.

``make_scheduler(config)`` reads a diffusers ``scheduler_config.json`` dict; the scheduler's
``set_timesteps(n)`` returns a ``SchedulePlan`` pytree, and ``scale_model_input`` / ``step``
take the plan and a (possibly traced) step index, so a sampling loop is one ``fori_loop``.
Timesteps, sigmas and steps follow diffusers 0.42.1 for the same config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from mixdq_jax.schedulers.common import SchedulePlan, Scheduler
from mixdq_jax.schedulers.euler import EulerDiscreteScheduler
from mixdq_jax.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from mixdq_jax.schedulers.lcm import LCMScheduler

SCHEDULERS: dict[str, type] = {
    cls.__name__: cls
    for cls in (EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler)
}


def make_scheduler(config: Mapping[str, Any], *, strict: bool = False) -> Scheduler:
    """Build the scheduler named by ``config["_class_name"]`` (a diffusers scheduler config).

    Keys the scheduler does not take are ignored, as in diffusers, unless ``strict``.
    """
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise ValueError(
            f"unsupported scheduler _class_name={name!r}; supported: {', '.join(SCHEDULERS)}"
        )
    return SCHEDULERS[name].from_config(config, strict=strict)


def default_scheduler(steps: int, override: str | None = None) -> str | None:
    """The scheduler to sample ``steps`` steps with, as ``load_pipeline(scheduler=...)`` takes
    it: ``override`` when given; else ``None`` (the model folder's own, e.g. SDXL-turbo's
    Euler-A trailing) for one step and ``"LCMScheduler"`` for more (the paper's few-step rows,
    and the testbed's multi-step sampler)."""
    if override is not None:
        return override
    return None if steps == 1 else "LCMScheduler"


def from_json(path: str | os.PathLike, *, strict: bool = False) -> Scheduler:
    """``make_scheduler`` on a ``scheduler_config.json`` file."""
    with open(path, encoding="utf-8") as f:
        return make_scheduler(json.load(f), strict=strict)


__all__ = [
    "SCHEDULERS",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "LCMScheduler",
    "SchedulePlan",
    "Scheduler",
    "default_scheduler",
    "from_json",
    "make_scheduler",
]
