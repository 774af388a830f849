"""The library's entry points above the runtime: load a pipeline, build a quantization config.

``load_pipeline`` reads a diffusers folder (float) or a ``mixdq export`` folder (a packed UNet
on the deployed integer path) into a :class:`~mixdq_jax.pipeline.Pipeline`. ``qconfig_for``
turns a :class:`~mixdq_jax.quant.QuantSpec` and a calibration into the config arrays the
pipeline takes as an argument::

    pipe = load_pipeline("testbed")
    qconfig = qconfig_for(pipe, QuantSpec(weight_bits=4, act_bits=8), calib="runs/demo")
    images = pipe(["a red circle"], qconfig=qconfig)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from mixdq_jax.deploy.checkpoint import is_quantized_folder, load_quantized_pipeline
from mixdq_jax.hub import ModelName
from mixdq_jax.loader import assemble, load_components, resolve_model
from mixdq_jax.pipeline import Pipeline, QuantizedPipeline
from mixdq_jax.quant.build import Calibration, act_ranges, qconfig_for
from mixdq_jax.quant.qconfig import QConfig, QuantSpec


def load_pipeline(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    revision: str | None = None,
    variant: str | None = None,
    scheduler: str | Mapping[str, Any] | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    allow_pickle: bool = False,
    backend: str = "auto",
    verify: bool = True,
) -> Pipeline | QuantizedPipeline:
    """Load a diffusers SDXL or SD1.x/2.x pipeline folder (or a Hugging Face repo id) into JAX.

    ``"testbed"`` loads the small trained model shipped inside the package. A repo id
    ``OWNER/NAME[@REVISION]`` (or ``revision=``: a branch, tag or commit) is downloaded into the
    hub cache on first use, only the files a load reads (``variant="fp16"``: the
    ``*.fp16.safetensors`` weights where a component has them); with ``HF_HUB_OFFLINE=1`` the
    cache alone is used. ``variant`` also picks a local folder's weight files.
    ``scheduler`` replaces the folder's scheduler: a class name (the folder's config is reused,
    as ``LCMScheduler.from_config(pipe.scheduler.config)``) or a full config dict. ``lora`` is a
    LoRA safetensors file fused into the weights with ``lora_scale``. A folder written by
    ``mixdq export`` loads as a `QuantizedPipeline`: the pipeline bound to its packed UNet on
    the integer path (``backend``; ``verify`` checks the weights' checksum); quantize a float
    pipeline with :func:`qconfig_for`. A ``lora`` on such a folder runs at run time through
    the layers' 16-bit side branch, without requantizing (`mixdq_jax.deploy.apply_lora`;
    several LoRAs and scale changes without recompiling: `apply_lora`, `set_lora_scales`).
    """
    if variant is None and isinstance(path_or_repo_id, ModelName):  # the CLI's --variant
        variant = path_or_repo_id.variant
    folder = resolve_model(path_or_repo_id, revision=revision, variant=variant)
    if is_quantized_folder(folder):
        pipe = load_quantized_pipeline(
            folder, dtype=dtype, variant=variant, scheduler=scheduler,
            allow_pickle=allow_pickle, backend=backend, verify=verify,
        )  # fmt: skip
        if lora is None:
            return pipe
        from mixdq_jax.deploy.lora import apply_lora  # noqa: PLC0415

        return apply_lora(pipe, [(lora, lora_scale)])
    parts = load_components(
        folder, dtype=dtype, variant=variant, allow_pickle=allow_pickle, lora=lora,
        lora_scale=lora_scale,
    )  # fmt: skip
    return assemble(folder, parts, scheduler)


def quantized_config(
    pipe: Pipeline, spec: QuantSpec | None, calib: Calibration | None = None
) -> QConfig | None:
    """The config of ``spec`` for a float pipeline (``None`` for ``spec=None``); a clear error
    for a pipeline whose UNet is already frozen to a quantized configuration."""
    if spec is None:
        return None
    if isinstance(pipe, QuantizedPipeline):
        raise ValueError(
            f"{pipe.source}: this model folder is already quantized; do not pass a quant spec "
            "(--weight-bits / --act-bits)"
        )
    return qconfig_for(pipe, spec, calib)


__all__ = ["act_ranges", "load_pipeline", "qconfig_for", "quantized_config"]
