"""Attach a quantization spec to a loaded pipeline (fake quantization of the UNet)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mixdq_jax.quant.apply import fake_quant_context
from mixdq_jax.quant.qconfig import QConfig, QuantSpec
from mixdq_jax.quant.registry import LayerInfo, build_registry


def layer_splits(layers: list[LayerInfo]) -> dict[str, int | None]:
    """``{name: split point or None}``, the form ``QuantSpec.to_qconfig`` takes."""
    return {layer.name: layer.split_channels for layer in layers}


def unet_layers(pipe: Any) -> list[LayerInfo]:
    """The pipeline UNet's quantizable layers (cached on the pipeline)."""
    key = "registry"
    if key not in pipe._cache:
        pipe._cache[key] = build_registry(pipe.unet.config)
    return pipe._cache[key]


def _quant_context(qconfig: QConfig):
    return fake_quant_context(qconfig)


def qconfig_for(
    pipe: Any,
    spec: QuantSpec,
    act_ranges: Mapping[str, Any] | None = None,
) -> QConfig:
    """The array config of ``spec`` for this pipeline's UNet layers."""
    return spec.to_qconfig(layer_splits(unet_layers(pipe)), act_ranges)


def quantize_pipeline(
    pipe: Any,
    spec: QuantSpec,
    *,
    calib: str | os.PathLike | Mapping[str, Any] | None = None,
) -> Any:
    """A copy of ``pipe`` whose UNet runs fake-quantized by ``spec``.

    ``calib``: a calibration run directory (see :func:`mixdq_jax.quant.calibrate.calibrate`)
    or a ``{layer: range}`` mapping; needed whenever activations are quantized.
    """
    ranges = None
    if calib is not None:
        if isinstance(calib, Mapping):
            ranges = calib
        else:
            from mixdq_jax.quant.calibrate import load_act_ranges  # noqa: PLC0415

            ranges = load_act_ranges(calib)
    qconfig = qconfig_for(pipe, spec, ranges)
    return pipe.with_quantization(_quant_context, qconfig)
