"""Calibration: run the float pipeline on prompts, record activation ranges and references.

The results go into the run directory (`mixdq_jax.rundir.RunDir`: ``calib/``): settings, one
file per batch (latents, conditioning, per-step UNet inputs and float outputs, float images,
the step-noise key, the batch's ranges) and the accumulated ranges. Batches already on disk
are skipped; each file is written atomically, so an interrupted run resumes at the first
missing batch and gives the same result as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mixdq_jax.compile_events import first_call
from mixdq_jax.pipeline import Pipeline, seed_keys
from mixdq_jax.quant.modes import Observe, update_ranges
from mixdq_jax.quant.qconfig import FLOAT_BITS, QUANT_BITS, QConfig, QuantSpec
from mixdq_jax.quant.registry import layer_splits, unet_layers
from mixdq_jax.rundir import KEY_NOISE, RunDir

_PROMPTS_FILE = Path(__file__).resolve().parent / "data" / "calib_prompts.txt"


def default_prompts(n: int = 32) -> list[str]:
    """The first ``n`` prompts of the list shipped with the package."""
    prompts = [p.strip() for p in _PROMPTS_FILE.read_text().splitlines() if p.strip()]
    if n > len(prompts):
        raise ValueError(f"only {len(prompts)} shipped calibration prompts, asked for {n}")
    return prompts[:n]


@dataclass(frozen=True, kw_only=True)
class CalibConfig:
    """How to calibrate. Ranges: ``"minmax"`` (running) or ``"ema"`` (official running_stat).

    ``observe_weight_bits`` < 16 observes the activation ranges on the model with weights at
    that bit-width (``symmetric_weights``: symmetric grid), as the official code does (W8);
    the references (UNet inputs, outputs, images) always come from the float model, so
    each batch then runs twice.
    """

    prompts: tuple[str, ...]
    num_inference_steps: int = 1
    guidance_scale: float = 0.0
    height: int = 512
    width: int = 512
    seed: int = 0
    batch_size: int = 8
    method: str = "minmax"
    momentum: float = 0.95
    observe_weight_bits: int = FLOAT_BITS
    symmetric_weights: bool = False

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("CalibConfig: no calibration prompts")
        if self.method not in ("minmax", "ema"):
            raise ValueError(f"CalibConfig: method must be 'minmax' or 'ema', not {self.method!r}")
        if self.batch_size < 1 or self.num_inference_steps < 1:
            raise ValueError("CalibConfig: batch_size and num_inference_steps must be >= 1")
        if self.observe_weight_bits not in (*QUANT_BITS, FLOAT_BITS):
            raise ValueError(
                f"CalibConfig: observe_weight_bits {self.observe_weight_bits} not in "
                f"{[*QUANT_BITS, FLOAT_BITS]}"
            )

    def settings(self) -> dict:
        """The settings a resumed run must match (the newer fields only when set, so runs
        calibrated before they existed still resume)."""
        out = asdict(self)
        out["prompts"] = list(self.prompts)
        if self.observe_weight_bits == FLOAT_BITS and not self.symmetric_weights:
            del out["observe_weight_bits"], out["symmetric_weights"]
        return out


def _dtype_name(pipe: Pipeline) -> str:
    return jnp.dtype(pipe.unet.dtype or jnp.float32).name


def float_qconfig(pipe: Pipeline) -> QConfig:
    """Every layer of the pipeline's UNet at float bits: what calibration observes."""
    return QuantSpec().to_qconfig(layer_splits(unet_layers(pipe.unet.config)))


def observed_qconfig(pipe: Pipeline, config: CalibConfig) -> QConfig:
    """The configuration whose activations calibration observes: float activations, weights
    at ``config.observe_weight_bits``."""
    spec = QuantSpec(
        weight_bits=config.observe_weight_bits, symmetric_weights=config.symmetric_weights
    )
    return spec.to_qconfig(layer_splits(unet_layers(pipe.unet.config)))


def run_batch(
    pipe: Pipeline,
    prompts: Sequence[str],
    config: CalibConfig,
    batch_index: int,
    qconfig: QConfig | None = None,
    observe: bool = True,
    embeddings: tuple[jax.Array, jax.Array | None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sample one batch step by step: ``(references, ranges)``: the inputs/outputs, images,
    conditioning and step-noise key, and (when observing) the batch's activation ranges.
    ``embeddings``: the batch's ``pipe.prompt_embeddings`` computed earlier (then the text
    encoders are not used)."""
    cfg = pipe.uses_cfg(config.guidance_scale)
    plan = pipe.scheduler.set_timesteps(config.num_inference_steps)
    if embeddings is None:
        embeddings = pipe.prompt_embeddings(list(prompts), None, config.guidance_scale)
    context, pooled = embeddings
    cond = pipe.conditioning(context, pooled, config.guidance_scale, config.height, config.width)
    factor = pipe.vae_scale_factor
    shape = (
        len(prompts),
        pipe.unet.config.in_channels,
        config.height // factor,
        config.width // factor,
    )
    key_latents, key_noise = seed_keys(config.seed + batch_index)
    latents = jax.random.normal(key_latents, shape, jnp.float32)
    step = pipe.compiled_step(cfg=cfg, mode=Observe() if observe else None)
    x = latents * plan.init_noise_sigma
    g = jnp.float32(config.guidance_scale)
    inputs, outputs, ranges = [], [], None
    for i in range(config.num_inference_steps):
        args = (pipe.params["unet"], qconfig, plan, i, x, cond, g, key_noise)
        with first_call("the UNet calibration step", step, *args):
            x, inp, out, stats = step(*args)
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
        KEY_NOISE: np.asarray(jax.random.key_data(key_noise)),
    }
    if pooled is not None:
        result["pooled"] = np.asarray(cond["added"]["text_embeds"])
    return result, {k: np.asarray(v) for k, v in (ranges or {}).items()}


def _meta(pipe: Pipeline, config: CalibConfig) -> dict:
    return {"config": config.settings(), "source": pipe.source, "dtype": _dtype_name(pipe)}


def _batches(config: CalibConfig) -> list[list[str]]:
    prompts = list(config.prompts)
    return [prompts[i : i + config.batch_size] for i in range(0, len(prompts), config.batch_size)]


def encode_batches(
    pipe: Pipeline, config: CalibConfig, run_dir: str | os.PathLike | RunDir
) -> dict[int, tuple[jax.Array, jax.Array | None]]:
    """The prompt embeddings of every calibration batch not yet in ``run_dir``, for
    :func:`calibrate` ``embeddings``: encode first, then calibrate with
    ``pipe.without_text_encoders()`` (the text encoders leave memory before the UNet work)."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run.start_calibration(_meta(pipe, config))  # a run with other settings fails here, at once
    return {
        b: pipe.prompt_embeddings(batch, None, config.guidance_scale)
        for b, batch in enumerate(_batches(config))
        if not run.has_batch(b)
    }


def calibrate(
    pipe: Pipeline,
    config: CalibConfig,
    run_dir: str | os.PathLike | RunDir,
    *,
    embeddings: Mapping[int, tuple[jax.Array, jax.Array | None]] | None = None,
) -> dict[str, np.ndarray]:
    """Calibrate ``pipe`` (float UNet) into ``run_dir``; returns the accumulated ranges.

    ``embeddings``: :func:`encode_batches` of this run (the batches to compute), so that
    ``pipe`` may have no text encoders; ``None``: encode each batch here.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    run.start_calibration(_meta(pipe, config))
    qconfig = float_qconfig(pipe)  # references: every layer with float weights and activations
    observed = None if config.observe_weight_bits == FLOAT_BITS else observed_qconfig(pipe, config)
    batches = _batches(config)
    for b, batch in enumerate(tqdm(batches, desc="calibration", unit="batch")):
        if run.has_batch(b):
            continue
        emb = None if embeddings is None else embeddings.get(b)
        arrays, ranges = run_batch(
            pipe, batch, config, b, qconfig, observe=observed is None, embeddings=emb
        )
        if observed is not None:
            _, ranges = run_batch(pipe, batch, config, b, observed, embeddings=emb)
        run.write_batch(b, arrays, ranges)
    ranges = None
    for b in range(len(batches)):
        batch = {k: jnp.asarray(v) for k, v in run.batch_ranges(b).items()}
        ranges = update_ranges(ranges, batch, method=config.method, momentum=config.momentum)
    ranges = {k: np.asarray(v) for k, v in ranges.items()}
    run.write_act_ranges(ranges)
    return ranges


__all__ = [
    "CalibConfig",
    "calibrate",
    "default_prompts",
    "encode_batches",
    "float_qconfig",
    "run_batch",
]
