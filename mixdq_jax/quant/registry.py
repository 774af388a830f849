"""The quantizable layers of a UNet: every Dense and Conv, with shapes, sizes and group.

Built by tracing the model's ``init`` once with ``jax.eval_shape`` in the shape-recording mode
of the one interceptor, so it needs no weights and works for the full-size SDXL UNet in a
second. Names are the diffusers PyTorch module names; the group follows MixDQ: *content*
layers (cross-attention ``attn2`` and feed-forward ``ff``) are judged by image SSIM,
*quality* layers (everything else) by SQNR.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import jax
import numpy as np

from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs, param_shapes
from mixdq_jax.quant.intercept import intercept
from mixdq_jax.quant.modes import RecordShapes

CONTENT_PARTS = ("attn2", "ff")


@dataclass(frozen=True, kw_only=True)
class LayerInfo:
    """One quantizable layer. Sizes are per sample, as the official ratio files count them."""

    name: str
    kind: str  # "linear" or "conv"
    group: str  # "content" or "quality"
    weight_shape: tuple[int, ...]  # Flax layout: (in, out) or (kh, kw, in, out)
    weight_params: int  # weight elements (bias excluded, as the official size term)
    bias_params: int
    input_shape: tuple[int, ...]  # one sample's input activation (NHWC / [L, C])
    input_size: int
    split_channels: int | None = None  # conv_shortcut of up blocks: channels of the first half

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def layer_group(name: str) -> str:
    """MixDQ's grouping: content if a path part is ``attn2`` or ``ff``, else quality."""
    parts = name.split(".")
    return "content" if any(p in CONTENT_PARTS for p in parts) else "quality"


def _shortcut_splits(config: UNetConfig) -> dict[str, int]:
    """Channels of the upsampled half in each up-block resnet's concatenated input.

    diffusers concatenates ``[hidden_states, skip]``; the skip of the last resnet of a block
    comes from the previous resolution level, so the split point differs per resnet.
    """
    out: dict[str, int] = {}
    rev = list(config.block_out_channels)[::-1]
    layers = config.per_block("layers_per_block")[::-1]
    for i in range(len(config.up_block_types)):
        prev_out = rev[max(i - 1, 0)]
        for j in range(layers[i] + 1):
            out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = prev_out if j == 0 else rev[i]
    return out


def build_registry(
    config: UNetConfig,
    *,
    height: int | None = None,
    width: int | None = None,
    seq_len: int = 77,
) -> list[LayerInfo]:
    """All quantizable layers in call order, at a latent of ``height`` x ``width``."""
    model = UNet2DConditionModel(config=config)
    inputs = example_inputs(config, batch=1, height=height, width=width, seq_len=seq_len)
    seen: dict[str, tuple[str, tuple[int, ...]]] = {}

    def init():
        with intercept(RecordShapes()) as records:
            variables = model.init(jax.random.key(0), **inputs)
        seen.update(records.data)
        return variables

    params = jax.eval_shape(init)["params"]
    splits = _shortcut_splits(config)
    layers = []
    for name, (kind, in_shape) in seen.items():
        node = _lookup(params, name)
        kernel = tuple(node["kernel"].shape)
        split = splits.get(name)
        layers.append(
            LayerInfo(
                name=name,
                kind=kind,
                group=layer_group(name),
                weight_shape=kernel,
                weight_params=int(np.prod(kernel)),
                bias_params=int(np.prod(node["bias"].shape)) if "bias" in node else 0,
                input_shape=in_shape,
                input_size=int(np.prod(in_shape)),
                split_channels=split,
            )
        )
    return layers


def _lookup(params: Any, name: str) -> Any:
    """Find a module's params by dotted name; module names themselves contain dots."""
    node, rest = params, name
    while rest:
        for key in sorted(node, key=len, reverse=True):
            if rest == key or rest.startswith(key + "."):
                node, rest = node[key], rest[len(key) + 1 :]
                break
        else:
            raise KeyError(f"layer {name!r} has no parameters in the model")
    return node


def traced_records(
    config: UNetConfig, mode: Any, *, batch: int, hw: tuple[int, int], seq_len: int
) -> dict[str, Any]:
    """What a collecting ``mode`` records over one abstract UNet forward (``jax.eval_shape``
    over the params' shapes: no weight is materialised, so the full-size UNet costs nothing)
    at ``batch`` x ``hw`` latents and ``seq_len`` text tokens."""
    model = UNet2DConditionModel(config=config)
    params = param_shapes(model)
    inputs = example_inputs(config, batch=batch, height=hw[0], width=hw[1], seq_len=seq_len)
    seen: dict[str, Any] = {}

    def run(p, kw):
        with intercept(mode) as records:
            out = model.apply({"params": p}, **kw)
        seen.update(records.data)
        return out

    jax.eval_shape(run, params, inputs)
    return seen


@functools.cache
def unet_layers(config: UNetConfig) -> tuple[LayerInfo, ...]:
    """The quantizable layers of a UNet config at its own sample size (cached per config)."""
    return tuple(build_registry(config))


def layer_splits(layers: Sequence[LayerInfo]) -> dict[str, int | None]:
    """``{name: split point or None}``, the form ``QuantSpec.to_qconfig`` takes."""
    return {layer.name: layer.split_channels for layer in layers}


def registry_from_unet_config(path_or_dict: Any, **kwargs: Any) -> list[LayerInfo]:
    """Registry straight from a diffusers ``unet/config.json`` (path or dict); no weights."""
    config = (
        UNetConfig.from_dict(path_or_dict)
        if isinstance(path_or_dict, dict)
        else UNetConfig.from_json(path_or_dict)
    )
    return build_registry(config, **kwargs)


def total_params(layers: list[LayerInfo]) -> int:
    return int(sum(layer.weight_params for layer in layers))
