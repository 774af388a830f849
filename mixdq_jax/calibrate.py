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
from mixdq_jax.quant.modes import Observe, ObserveQuantized, update_ranges
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
    each batch then runs twice. ``ema_updates``: EMA updates per UNet call with the same
    observed range (the released quantizer updates once per bit-width of its
    ``mixed_precision`` list: 3, an effective momentum ``0.95 ** 3 = 0.857``).
    ``observe_act_bits`` < 16 (with ``method="ema"``) is the released loop
    (`ObserveQuantized`): each call updates the running ranges and quantizes the activations
    with them at that bit-width while observing; a batch file then holds the running ranges
    after that batch, and the last batch's are the result.
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
    ema_updates: int = 1
    observe_act_bits: int = FLOAT_BITS

    def __post_init__(self) -> None:
        if self.ema_updates < 1:
            raise ValueError(f"CalibConfig: ema_updates {self.ema_updates} must be >= 1")
        if self.observe_act_bits not in (*QUANT_BITS, FLOAT_BITS):
            raise ValueError(
                f"CalibConfig: observe_act_bits {self.observe_act_bits} not in "
                f"{[*QUANT_BITS, FLOAT_BITS]}"
            )
        if self.observe_act_bits < FLOAT_BITS and self.method != "ema":
            raise ValueError(
                "CalibConfig: observing with quantized activations (observe_act_bits "
                f"{self.observe_act_bits}) is the released running-EMA loop: set method='ema'"
            )
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
        if self.ema_updates == 1:
            del out["ema_updates"]
        if self.observe_act_bits == FLOAT_BITS:
            del out["observe_act_bits"]
        return out

    @property
    def call_momentum(self) -> float:
        """The EMA momentum of one UNet call (``momentum ** ema_updates``)."""
        return self.momentum**self.ema_updates

    @property
    def observes_quantized(self) -> bool:
        """Whether calibration runs the released loop (`ObserveQuantized`)."""
        return self.observe_act_bits < FLOAT_BITS


def _dtype_name(pipe: Pipeline) -> str:
    return jnp.dtype(pipe.unet.dtype or jnp.float32).name


def float_qconfig(pipe: Pipeline) -> QConfig:
    """Every layer of the pipeline's UNet at float bits: what calibration observes."""
    return QuantSpec().to_qconfig(layer_splits(unet_layers(pipe.unet.config)))


def observed_qconfig(pipe: Pipeline, config: CalibConfig) -> QConfig:
    """The configuration whose activations calibration observes: weights at
    ``config.observe_weight_bits``, activations float or (the released loop,
    `ObserveQuantized.running` sets the ranges of each call) at ``config.observe_act_bits``."""
    spec = QuantSpec(
        weight_bits=config.observe_weight_bits, symmetric_weights=config.symmetric_weights,
        act_bits=config.observe_act_bits,
    )  # fmt: skip
    splits = layer_splits(unet_layers(pipe.unet.config))
    if not config.observes_quantized:
        return spec.to_qconfig(splits)
    placeholder = {n: np.zeros((1 if s is None or not spec.shortcut_split else 2, 2))
                   for n, s in splits.items()}  # fmt: skip
    return spec.to_qconfig(splits, placeholder)


def run_batch(
    pipe: Pipeline,
    prompts: Sequence[str],
    config: CalibConfig,
    batch_index: int,
    qconfig: QConfig | None = None,
    observe: bool = True,
    embeddings: tuple[jax.Array, jax.Array | None] | None = None,
    running: Mapping[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sample one batch step by step: ``(references, ranges)``: the inputs/outputs, images,
    conditioning and step-noise key, and (when observing) the batch's activation ranges.
    ``embeddings``: the batch's ``pipe.prompt_embeddings`` computed earlier (then the text
    encoders are not used). With ``config.observes_quantized`` (the released loop) the
    ranges are the running ranges after this batch, starting from ``running``."""
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
    released = observe and config.observes_quantized
    mode = ObserveQuantized(momentum=config.call_momentum) if released else Observe()
    step = pipe.compiled_step(cfg=cfg, mode=mode if observe else None)
    x = latents * plan.init_noise_sigma
    g = jnp.float32(config.guidance_scale)
    inputs, outputs, ranges = [], [], None
    for i in range(config.num_inference_steps):
        if released:  # every call starts from the running ranges of the one before
            qconfig = ObserveQuantized.running(qconfig, running if ranges is None else ranges)
        args = (pipe.params["unet"], qconfig, plan, i, x, cond, g, key_noise)
        with first_call("the UNet calibration step", step, *args):
            x, inp, out, stats = step(*args)
        inputs.append(np.asarray(inp))
        outputs.append(np.asarray(out))
        if released:
            ranges = {k: np.asarray(v) for k, v in stats.items()}
        elif observe:
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
    separate = config.observe_weight_bits < FLOAT_BITS or config.observes_quantized
    observed = observed_qconfig(pipe, config) if separate else None
    batches = _batches(config)
    running = None  # the released loop's ranges after the batch before (None: read on resume)
    for b, batch in enumerate(tqdm(batches, desc="calibration", unit="batch")):
        if run.has_batch(b):
            running = None
            continue
        emb = None if embeddings is None else embeddings.get(b)
        arrays, ranges = run_batch(
            pipe, batch, config, b, qconfig, observe=observed is None, embeddings=emb
        )
        if observed is not None:
            # the released loop continues from the running ranges after the batch before
            if config.observes_quantized and b and running is None:
                running = run.batch_ranges(b - 1)
            _, ranges = run_batch(pipe, batch, config, b, observed, embeddings=emb, running=running)
            running = ranges if config.observes_quantized else None
        run.write_batch(b, arrays, ranges)
    if config.observes_quantized:  # the running ranges after the last batch
        ranges = dict(run.batch_ranges(len(batches) - 1))
    else:
        ranges = None
        for b in range(len(batches)):
            batch = {k: jnp.asarray(v) for k, v in run.batch_ranges(b).items()}
            ranges = update_ranges(
                ranges, batch, method=config.method, momentum=config.call_momentum
            )
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
