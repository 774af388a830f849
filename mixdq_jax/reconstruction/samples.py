"""Calibration samples for reconstruction: every UNet input a calibration run recorded.

A calibration run keeps the UNet input of every sampling step (`CalibBatch.inputs`), so the
samples span all the steps of a multi-step model (Q-Diffusion's time-step-aware calibration
draws from every step in the same way; here the steps are the model's own few). Each sample is
one row of one step with its own timestep and conditioning.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from mixdq_jax.pipeline import Pipeline
from mixdq_jax.sensitivity.calibration import CalibData


def unet_samples(pipe: Pipeline, calib: CalibData) -> dict[str, Any]:
    """``{"sample", "t", "context", "added", "timestep_cond"}`` with one leading axis over
    (step, row) pairs of every calibration batch (the batch `blocks.unet_apply` takes)."""
    timesteps = np.asarray(pipe.scheduler.set_timesteps(calib.steps).timesteps)
    parts = []
    for batch in calib.batches:
        context = jnp.asarray(batch.context)
        pooled = None if batch.pooled is None else jnp.asarray(batch.pooled)
        cond = pipe.conditioning(context, pooled, calib.guidance, calib.height, calib.width)
        steps, rows = batch.inputs.shape[:2]
        for s in range(steps):
            parts.append(
                {
                    "sample": np.asarray(batch.inputs[s]),
                    "t": np.full((rows,), timesteps[s], np.float32),
                    "context": np.asarray(cond["context"]),
                    "added": None
                    if cond["added"] is None
                    else {k: np.asarray(v) for k, v in cond["added"].items()},
                    "timestep_cond": None
                    if cond["timestep_cond"] is None
                    else np.asarray(cond["timestep_cond"]),
                }
            )
    return _concat(parts)


def sample_positions(calib: CalibData) -> tuple[np.ndarray, np.ndarray]:
    """``(step, trajectory)`` of every sample of `unet_samples` (same order): the sampling
    step and the UNet row over all calibration batches (one row = one trajectory)."""
    steps, trajectories, offset = [], [], 0
    for batch in calib.batches:
        n_steps, rows = batch.inputs.shape[:2]
        for s in range(n_steps):
            steps.append(np.full((rows,), s, np.int64))
            trajectories.append(offset + np.arange(rows, dtype=np.int64))
        offset += rows
    return np.concatenate(steps), np.concatenate(trajectories)


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, first in parts[0].items():
        if first is None:
            out[key] = None
        elif isinstance(first, dict):
            out[key] = _concat([p[key] for p in parts])
        else:
            out[key] = np.concatenate([p[key] for p in parts])
    return out
