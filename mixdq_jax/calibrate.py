"""Calibration: run the float pipeline on prompts, record activation ranges and references.

A run directory holds everything later steps need and survives a kill:

    RUN/calib/meta.json          settings (a resumed run must match them)
    RUN/calib/batch_00000.npz    per batch: latents, conditioning, per-step UNet inputs and
                                 float outputs, float images, and that batch's act ranges
    RUN/calib/act_ranges.npz     ranges accumulated over all batches (running min/max or EMA)

Batches already on disk are skipped; each file is written atomically, so an interrupted run
resumes at the first missing batch and gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mixdq_jax.io_utils import atomic_write_bytes, atomic_write_json
from mixdq_jax.pipeline import seed_keys
from mixdq_jax.quant.apply import fake_quant_context, update_ranges
from mixdq_jax.quant.qconfig import QuantSpec
from mixdq_jax.quant.quantize import qconfig_for

_PROMPTS_FILE = Path(__file__).resolve().parents[1] / "data" / "calib_prompts.txt"


def default_prompts(n: int = 32) -> list[str]:
    """The first ``n`` prompts of the list shipped with the package."""
    prompts = [p.strip() for p in _PROMPTS_FILE.read_text().splitlines() if p.strip()]
    if n > len(prompts):
        raise ValueError(f"only {len(prompts)} shipped calibration prompts, asked for {n}")
    return prompts[:n]


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """How to calibrate. Ranges: ``"minmax"`` (running) or ``"ema"`` (official running_stat)."""

    prompts: tuple[str, ...]
    num_inference_steps: int = 1
    guidance_scale: float = 0.0
    height: int = 512
    width: int = 512
    seed: int = 0
    batch_size: int = 8
    method: str = "minmax"
    momentum: float = 0.95

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("CalibConfig: no calibration prompts")
        if self.method not in ("minmax", "ema"):
            raise ValueError(f"CalibConfig: method must be 'minmax' or 'ema', not {self.method!r}")
        if self.batch_size < 1 or self.num_inference_steps < 1:
            raise ValueError("CalibConfig: batch_size and num_inference_steps must be >= 1")


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _observe_unet(pipe, params, qconfig, sample, t, cond):
    with fake_quant_context(qconfig, mode="observe") as rec:
        out = pipe.unet.apply(
            {"params": params},
            sample,
            t,
            cond["context"],
            added_cond_kwargs=cond["added"],
            timestep_cond=cond["timestep_cond"],
        )
    return out, rec.stats


def run_batch(
    pipe: Any,
    prompts: Sequence[str],
    config: CalibConfig,
    batch_index: int,
    qconfig: Any = None,
    observe: bool = True,
) -> dict[str, np.ndarray]:
    """Sample one batch step by step, returning inputs/outputs (and ranges when observing)."""
    cfg = pipe._do_cfg(config.guidance_scale)
    plan = pipe.scheduler.set_timesteps(config.num_inference_steps)
    context, pooled = pipe.prompt_embeddings(list(prompts), None, config.guidance_scale)
    cond = pipe.conditioning(context, pooled, config.guidance_scale, config.height, config.width)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (
        len(prompts),
        pipe.unet.config.in_channels,
        config.height // factor,
        config.width // factor,
    )
    key_latents, key_noise = seed_keys(config.seed + batch_index)
    latents = jax.random.normal(key_latents, shape, jnp.float32)
    key = ("calib_step", cfg, observe)
    step = pipe._cache.get(key)
    if step is None:
        unet_fn = partial(_observe_unet, pipe) if observe else None
        step = pipe._cache[key] = jax.jit(partial(pipe.sample_step, cfg=cfg, unet_fn=unet_fn))
    x = latents * plan.init_noise_sigma
    g = jnp.float32(config.guidance_scale)
    inputs, outputs, ranges = [], [], None
    for i in range(config.num_inference_steps):
        x, inp, out, stats = step(pipe.params["unet"], qconfig, plan, i, x, cond, g, key_noise)
        inputs.append(np.asarray(inp))
        outputs.append(np.asarray(out))
        if observe:
            ranges = update_ranges(ranges, stats, method="minmax")
    images = np.asarray(pipe.decode(x))
    result = {
        "latents": np.asarray(latents),
        "unet_inputs": np.stack(inputs),
        "unet_outputs": np.stack(outputs),
        "timesteps": np.asarray(plan.timesteps),
        "images": images,
        "context": np.asarray(cond["context"]),
    }
    if pooled is not None:
        result["pooled"] = np.asarray(cond["added"]["text_embeds"])
    if ranges is not None:
        result.update({f"range/{k}": np.asarray(v) for k, v in ranges.items()})
    return result


def calibrate(pipe: Any, config: CalibConfig, run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Calibrate ``pipe`` (float UNet) into ``run_dir``; returns the accumulated ranges."""
    calib = Path(run_dir) / "calib"
    calib.mkdir(parents=True, exist_ok=True)
    meta = {"config": asdict(config), "source": pipe.source}
    meta["config"]["prompts"] = list(config.prompts)
    meta_path = calib / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if old.get("config") != meta["config"]:
            raise ValueError(
                f"{meta_path}: this run directory was calibrated with other settings; use a "
                "new --run directory (or delete the old calib/ folder)"
            )
    else:
        atomic_write_json(meta_path, meta)
    # observe every layer with float weights and activations
    layers_spec = QuantSpec()
    qconfig = qconfig_for(pipe, layers_spec)
    prompts = list(config.prompts)
    starts = list(range(0, len(prompts), config.batch_size))
    for b, start in enumerate(tqdm(starts, desc="calibration", unit="batch")):
        path = calib / f"batch_{b:05d}.npz"
        if path.is_file():
            continue
        result = run_batch(pipe, prompts[start : start + config.batch_size], config, b, qconfig)
        atomic_write_bytes(path, _npz_bytes(result))
    ranges = None
    for b in range(len(starts)):
        with np.load(calib / f"batch_{b:05d}.npz") as data:
            batch = {k[6:]: jnp.asarray(data[k]) for k in data.files if k.startswith("range/")}
        ranges = update_ranges(ranges, batch, method=config.method, momentum=config.momentum)
    ranges = {k: np.asarray(v) for k, v in ranges.items()}
    atomic_write_bytes(calib / "act_ranges.npz", _npz_bytes(ranges))
    return ranges


def load_act_ranges(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """The accumulated activation ranges of a calibration run."""
    path = Path(run_dir) / "calib" / "act_ranges.npz"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no calibration ranges; run `mixdq calibrate --run {run_dir}` first"
        )
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def load_references(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All calibration batches' float references, concatenated along the batch axis."""
    calib = Path(run_dir) / "calib"
    files = sorted(calib.glob("batch_*.npz"))
    if not files:
        raise FileNotFoundError(f"{calib}: no calibration batches")
    parts: dict[str, list[np.ndarray]] = {}
    for f in files:
        with np.load(f) as data:
            for k in data.files:
                if not k.startswith("range/") and k != "timesteps":
                    parts.setdefault(k, []).append(data[k])
    axis = {"unet_inputs": 1, "unet_outputs": 1}
    return {k: np.concatenate(v, axis=axis.get(k, 0)) for k, v in parts.items()}


__all__ = [
    "CalibConfig",
    "calibrate",
    "default_prompts",
    "load_act_ranges",
    "load_references",
    "run_batch",
]
