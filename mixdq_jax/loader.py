"""Reading a diffusers pipeline folder into Flax components: the one loader.

Model index, component configs, weights (safetensors through `weights_convert`, LoRA fusion),
tokenizers and the scheduler config are read here and nowhere else; `mixdq_jax.api` builds a
:class:`~mixdq_jax.pipeline.Pipeline` from the result, and `mixdq_jax.deploy` reuses it for
the float components of a quantized folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mixdq_jax.hub import ModelName
from mixdq_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, param_shapes
from mixdq_jax.models.vae import AutoencoderKL, VAEConfig, legacy_vae_keys
from mixdq_jax.pipeline import Pipeline, TextStack
from mixdq_jax.schedulers import make_scheduler
from mixdq_jax.testbed import testbed_path
from mixdq_jax.tokenizer import CLIPTokenizer
from weights_convert import torch_to_flax
from weights_convert.checkpoint import (
    CheckpointError,
    load_component_weights,
    read_json,
    read_model_index,
    resolve_model_path,
)
from weights_convert.clip_keys import normalize_clip_keys
from weights_convert.lora import fuse_lora
from weights_convert.safetensors_io import load_safetensors, release_pages

PIPELINES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": "sd"}
_TEXT_CLASSES = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}


def _component_class(index: Mapping[str, Any], name: str, folder: Path) -> str | None:
    entry = index.get(name)
    if entry is None or entry == [None, None]:
        return None
    if not (isinstance(entry, list) and len(entry) == 2):
        raise CheckpointError(f"{folder}/model_index.json: entry {name!r} is malformed: {entry!r}")
    return entry[1]


def _load_params(
    folder: Path,
    name: str,
    target: Mapping,
    state: Mapping[str, np.ndarray],
    sources: Mapping[str, str],
    dtype: Any,
) -> dict:
    """One component's params, converted and put on the device one tensor at a time (the
    state is memory-mapped: no second host copy of the model), with a progress bar."""
    progress = partial(
        tqdm, desc=f"loading {name}", unit="tensor", total=len(jax.tree.leaves(target)),
        file=sys.stderr, leave=False, disable=None,
    )  # fmt: skip
    return torch_to_flax(
        state, target, sources=sources, what=f"{folder.name}/{name}", dtype=dtype,
        to_leaf=jnp.asarray, release=release_pages, progress=progress,
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Components:
    """The models of a diffusers pipeline folder, loaded into Flax (``unet`` None when not
    asked for: a quantized folder's UNet is loaded by `mixdq_jax.deploy`)."""

    kind: str  # "sdxl" | "sd"
    unet: UNet2DConditionModel | None
    vae: AutoencoderKL
    text: tuple[TextStack, ...]
    params: dict[str, Any]
    force_zeros_for_empty_prompt: bool


def load_components(
    folder: Path,
    *,
    dtype: Any = jnp.float32,
    variant: str | None = None,
    allow_pickle: bool = False,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    unet: bool = True,
) -> Components:
    """UNet (if ``unet``), VAE, text encoders and tokenizers of a pipeline folder."""
    index = read_model_index(folder)
    kind = PIPELINES.get(index.get("_class_name", ""))
    if kind is None:
        raise CheckpointError(
            f"{folder}/model_index.json: pipeline class {index.get('_class_name')!r} is not "
            f"supported (supported: {', '.join(PIPELINES)})"
        )
    dtype = jnp.dtype(dtype)
    text_names = ["text_encoder", "text_encoder_2"] if kind == "sdxl" else ["text_encoder"]

    states, sources = {}, {}
    for name in [*(["unet"] if unet else []), "vae", *text_names]:
        if _component_class(index, name, folder) is None:
            raise CheckpointError(f"{folder}: model_index.json lists no {name!r} component")
        weights = load_component_weights(folder / name, variant=variant, allow_pickle=allow_pickle)
        state = weights.state
        if name == "vae":
            state = legacy_vae_keys(state)
        elif name.startswith("text_encoder"):
            state = normalize_clip_keys(state)
        states[name] = state
        sources[name] = {
            k: weights.sources.get(k, weights.sources.get(f"text_model.{k}", "")) for k in state
        }
    if lora is not None:
        lora_path = Path(lora)
        states = fuse_lora(
            states, load_safetensors(lora_path), scale=lora_scale, source=str(lora_path)
        )

    params: dict[str, Any] = {}
    unet_model = None
    if unet:
        unet_cfg = UNetConfig.from_dict(
            read_json(folder / "unet" / "config.json", what="unet config")
        )
        unet_model = UNet2DConditionModel(config=unet_cfg, dtype=dtype, param_dtype=dtype)
        params["unet"] = _load_params(
            folder, "unet", param_shapes(unet_model), states["unet"], sources["unet"], dtype
        )
    vae_cfg = VAEConfig.from_dict(read_json(folder / "vae" / "config.json", what="vae config"))
    vae_dtype = jnp.float32 if vae_cfg.force_upcast else dtype
    vae = AutoencoderKL(config=vae_cfg, dtype=vae_dtype, param_dtype=vae_dtype)
    vae_target = jax.eval_shape(
        lambda: vae.init(jax.random.key(0), jnp.zeros((1, vae_cfg.in_channels, 8, 8)))
    )["params"]
    params["vae"] = _load_params(
        folder, "vae", vae_target, states["vae"], sources["vae"], vae_dtype
    )
    stacks = []
    for name in text_names:
        cls_name = _component_class(index, name, folder)
        if cls_name not in _TEXT_CLASSES:
            raise CheckpointError(
                f"{folder}/model_index.json: {name} class {cls_name!r} is not supported "
                f"(supported: {', '.join(_TEXT_CLASSES)})"
            )
        cfg = CLIPTextConfig.from_dict(
            read_json(folder / name / "config.json", what=f"{name} config")
        )
        model = _TEXT_CLASSES[cls_name](config=cfg, dtype=dtype, param_dtype=dtype)
        target = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
        )["params"]
        params[name] = _load_params(folder, name, target, states[name], sources[name], dtype)
        tok_name = name.replace("text_encoder", "tokenizer")
        stacks.append(
            TextStack(
                name=name, tokenizer=CLIPTokenizer.from_pretrained(folder / tok_name), model=model
            )
        )
    return Components(
        kind=kind, unet=unet_model, vae=vae, text=tuple(stacks), params=params,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )  # fmt: skip


def scheduler_config(folder: Path, scheduler: str | Mapping[str, Any] | None = None) -> dict:
    """The folder's scheduler config; ``scheduler`` replaces its class (a name, keeping the
    config, as ``from_config``) or all of it (a dict)."""
    cfg = read_json(folder / "scheduler" / "scheduler_config.json", what="scheduler config")
    if isinstance(scheduler, str):
        return {**cfg, "_class_name": scheduler}
    return dict(scheduler) if scheduler is not None else cfg


def resolve_model(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    variant: str | None = None,
    configs_only: bool | None = None,
) -> Path:
    """A ``--model`` argument as a folder, tried in this order: ``"testbed"``, an existing
    local folder, a Hugging Face repo id ``OWNER/NAME[@REVISION]`` (downloaded into the hub
    cache on first use, only the files a load reads: ``variant``'s weights, or the configs
    alone with ``configs_only``; offline, the cache). A `~mixdq_jax.hub.ModelName` (the CLI's
    ``--model`` value) brings its own ``revision`` / ``variant`` / ``configs_only``; arguments
    given here win.
    """
    if isinstance(model, ModelName):
        revision = model.revision if revision is None else revision
        variant = model.variant if variant is None else variant
        configs_only = model.configs_only if configs_only is None else configs_only
    if str(model) == "testbed":
        if revision is not None:
            raise CheckpointError(
                f"testbed: the built-in model has no revision {revision!r} (a revision selects "
                "a commit of a Hugging Face repo id OWNER/NAME)"
            )
        return testbed_path()
    return resolve_model_path(
        model, revision=revision, variant=variant, download=True, configs_only=bool(configs_only)
    )


def assemble(
    folder: Path,
    parts: Components,
    scheduler: str | Mapping[str, Any] | None = None,
    *,
    unet: UNet2DConditionModel | None = None,
) -> Pipeline:
    """The :class:`Pipeline` of loaded components and the folder's (or a replaced) scheduler.
    ``unet``: the UNet module of a UNet loaded elsewhere (a packed one, whose params are a
    `QuantizedUNet`'s)."""
    params = dict(parts.params)
    return Pipeline(
        kind=parts.kind,
        unet=parts.unet if unet is None else unet,
        vae=parts.vae,
        text=parts.text,
        scheduler=make_scheduler(scheduler_config(folder, scheduler)),
        params=params,
        force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        source=str(folder),
    )
