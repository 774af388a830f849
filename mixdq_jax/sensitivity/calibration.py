"""A calibration run's float references as the sweeps need them, checked against a pipeline."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from mixdq_jax.pipeline import Pipeline
from mixdq_jax.quant.registry import unet_layers
from mixdq_jax.rundir import KEY_NOISE, RunDir


@dataclass(frozen=True, kw_only=True)
class CalibBatch:
    """One calibration batch's float references (CFG rows in the pipeline's [neg; pos] order)."""

    index: int
    latents: np.ndarray  # [B, C, h, w]
    context: np.ndarray  # [R, 77, D]  (R = 2B with CFG, else B)
    pooled: np.ndarray | None  # [R, P]
    inputs: np.ndarray  # [S, R, C, h, w] the UNet inputs of every step
    outputs: np.ndarray  # [S, R, C, h, w] the float UNet outputs
    images: np.ndarray  # [B, H, W, 3]
    key_noise: np.ndarray  # raw key data of the calibration's step noise


@dataclass(frozen=True, kw_only=True)
class CalibData:
    """A calibration run as the sweep needs it."""

    meta: dict[str, Any]
    ranges: dict[str, np.ndarray]
    batches: tuple[CalibBatch, ...]
    steps: int
    guidance: float
    height: int
    width: int


def load_calibration(run_dir: str | os.PathLike | RunDir, pipe: Pipeline) -> CalibData:
    """The float references of a complete calibration run, checked against ``pipe``."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    meta = run.calib_meta()
    ranges = run.act_ranges()  # written last: its presence means calibration finished
    cfg = meta["config"]
    steps, guidance = int(cfg["num_inference_steps"]), float(cfg["guidance_scale"])
    plan = pipe.scheduler.set_timesteps(steps)
    stored_t = run.batch_arrays(0, "timesteps")["timesteps"]
    if stored_t.shape != np.shape(plan.timesteps) or not np.allclose(
        stored_t, np.asarray(plan.timesteps)
    ):
        raise ValueError(
            f"{run.path}: calibrated with timesteps {stored_t.tolist()} but this pipeline's "
            f"scheduler gives {np.asarray(plan.timesteps).tolist()}; load the model with the "
            "scheduler used for calibration (--scheduler)"
        )
    dtype = jnp.dtype(pipe.unet.dtype or jnp.float32).name
    if meta.get("dtype", dtype) != dtype:
        raise ValueError(
            f"{run.path}: calibrated with the model in {meta['dtype']}, this pipeline runs in "
            f"{dtype}; load it with dtype={meta['dtype']!r} (--dtype {meta['dtype']})"
        )
    known = {layer.name for layer in unet_layers(pipe.unet.config)}
    if set(ranges) != known:
        raise ValueError(
            f"{run.path}: calibrated layers differ from this model's ({len(ranges)} vs "
            f"{len(known)}); was it calibrated with another model?"
        )
    refs = run.references()
    cfg_on = pipe.uses_cfg(guidance)
    n, bs = len(cfg["prompts"]), int(cfg["batch_size"])
    sizes = [min(bs, n - s) for s in range(0, n, bs)]
    batches, row, lat = [], 0, 0
    for b, size in enumerate(sizes):
        rows = 2 * size if cfg_on else size
        sl, rl = slice(lat, lat + size), slice(row, row + rows)
        batches.append(
            CalibBatch(
                index=b,
                latents=refs["latents"][sl],
                context=refs["context"][rl],
                pooled=refs["pooled"][rl] if "pooled" in refs else None,
                inputs=refs["unet_inputs"][:, rl],
                outputs=refs["unet_outputs"][:, rl],
                images=refs["images"][sl],
                key_noise=run.batch_arrays(b, KEY_NOISE)[KEY_NOISE],
            )
        )
        lat, row = lat + size, row + rows
    if lat != refs["latents"].shape[0] or row != refs["unet_inputs"].shape[1]:
        raise ValueError(f"{run.path}: calibration batches do not match calib/meta.json")
    return CalibData(
        meta=meta,
        ranges=ranges,
        batches=tuple(batches),
        steps=steps,
        guidance=guidance,
        height=int(cfg["height"]),
        width=int(cfg["width"]),
    )
