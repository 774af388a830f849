"""Text-to-image pipelines (SDXL and SD1.x/2.x) as jit-compiled pure functions.

``load_pipeline(path)`` reads a diffusers folder and returns a :class:`Pipeline` whose call
mirrors diffusers' ``pipe(prompt, ...)``. The three stages (text encoding, the whole denoising
loop, VAE decoding) are each one jitted function of (params, inputs); the UNet stage also takes
a quantization config as data, so a fake-quantized model reuses the same compiled loop for
every per-layer configuration.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, param_shapes
from mixdq_jax.models.vae import AutoencoderKL, VAEConfig, legacy_vae_keys
from mixdq_jax.schedulers import make_scheduler
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
from weights_convert.safetensors_io import load_safetensors

_PIPELINES = {"StableDiffusionXLPipeline": "sdxl", "StableDiffusionPipeline": "sd"}
_TEXT_CLASSES = {
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}

# A UNet wrapper: given the quantization config (a pytree, possibly None), returns a context
# manager under which the UNet runs (e.g. a fake-quant interceptor). Float: a null context.
UNetContext = Callable[[Any], contextlib.AbstractContextManager]


def _float_context(_qconfig: Any) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True, kw_only=True)
class TextStack:
    """One CLIP text encoder with its tokenizer."""

    name: str  # "text_encoder" or "text_encoder_2"
    tokenizer: CLIPTokenizer
    model: CLIPTextModel | CLIPTextModelWithProjection


@dataclass(frozen=True, kw_only=True)
class Pipeline:
    """A loaded text-to-image pipeline: modules, parameters and scheduler.

    Parameters live in ``params`` (``{"unet", "vae", "text_encoder", ["text_encoder_2"]}``) so
    they can be replaced (quantized, sharded) without rebuilding the modules.
    """

    kind: str  # "sdxl" or "sd"
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: tuple[TextStack, ...]
    scheduler: Any
    params: Mapping[str, Any]
    force_zeros_for_empty_prompt: bool = True
    unet_context: UNetContext = _float_context
    qconfig: Any = None
    source: str = ""
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------- text encoding
    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
        return tuple(stack.tokenizer(list(prompts)) for stack in self.text)

    def encode_prompt(self, ids: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array | None]:
        """(context [B, 77, D], pooled [B, P] or None) from token ids, as diffusers."""
        fn = self._cache.get("encode")
        if fn is None:
            fn = self._cache["encode"] = jax.jit(self._encode)
        return fn({s.name: self.params[s.name] for s in self.text}, ids)

    def _encode(self, params, ids):
        states, pooled = [], None
        for stack, tok in zip(self.text, ids, strict=True):
            out = stack.model.apply({"params": params[stack.name]}, tok)
            if self.kind == "sdxl":
                states.append(out.hidden_states[-2])
                pooled = getattr(out, "text_embeds", None)
                if pooled is None:
                    pooled = out.pooler_output
            else:
                states.append(out.last_hidden_state)
        return jnp.concatenate(states, axis=-1), pooled

    # ----------------------------------------------------------------- denoising
    def denoise(
        self,
        latents: jax.Array,
        context: jax.Array,
        pooled: jax.Array | None,
        *,
        num_inference_steps: int,
        guidance_scale: float,
        height: int,
        width: int,
        noise_key: jax.Array,
        qconfig: Any = None,
    ) -> jax.Array:
        """Run the whole sampling loop (one jitted call). ``latents`` are unscaled N(0, 1)."""
        plan = self.scheduler.set_timesteps(num_inference_steps)
        cfg = self._do_cfg(guidance_scale)
        key = ("denoise", num_inference_steps, cfg)
        fn = self._cache.get(key)
        if fn is None:
            fn = self._cache[key] = jax.jit(partial(self._denoise, cfg=cfg))
        cond = self.conditioning(context, pooled, guidance_scale, height, width)
        return fn(
            self.params["unet"],
            qconfig,
            plan,
            latents,
            cond,
            jnp.float32(guidance_scale),
            noise_key,
        )

    def _do_cfg(self, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None

    def conditioning(
        self,
        context: jax.Array,
        pooled: jax.Array | None,
        guidance_scale: float,
        height: int,
        width: int,
    ) -> dict[str, Any]:
        """UNet conditioning besides the sample: context, added embeddings, guidance embedding."""
        added = None
        if self.unet.config.addition_embed_type == "text_time":
            time_ids = jnp.asarray([height, width, 0, 0, height, width], jnp.float32)
            added = {
                "text_embeds": pooled,
                "time_ids": jnp.broadcast_to(time_ids, (context.shape[0], 6)),
            }
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            w = jnp.full((context.shape[0],), guidance_scale - 1.0, jnp.float32)
            timestep_cond = guidance_scale_embedding(w, self.unet.config.time_cond_proj_dim)
        return {"context": context, "added": added, "timestep_cond": timestep_cond}

    def unet_apply(self, params, qconfig, sample, t, cond):
        """One UNet evaluation under the quantization context (float when qconfig is None)."""
        with self.unet_context(qconfig):
            return self.unet.apply(
                {"params": params},
                sample,
                t,
                cond["context"],
                added_cond_kwargs=cond["added"],
                timestep_cond=cond["timestep_cond"],
            )

    def sample_step(self, params, qconfig, plan, i, x, cond, g, key, *, cfg, unet_fn=None):
        """One denoising step: ``(x_next, model_input, model_output, aux)``.

        ``unet_fn(params, qconfig, sample, t, cond) -> (output, aux)`` replaces the UNet call
        (calibration observes activations this way); by default :meth:`unet_apply`.
        """
        inp = jnp.concatenate([x, x]) if cfg else x
        inp = self.scheduler.scale_model_input(plan, inp, i).astype(self.unet.dtype)
        t = plan.timesteps[i]
        if unet_fn is None:
            out, aux = self.unet_apply(params, qconfig, inp, t, cond), None
        else:
            out, aux = unet_fn(params, qconfig, inp, t, cond)
        guided = out.astype(jnp.float32)
        if cfg:
            uncond, text = jnp.split(guided, 2)
            guided = uncond + g * (text - uncond)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        x_next = self.scheduler.step(plan, guided, i, x, noise).astype(x.dtype)
        return x_next, inp, out, aux

    def _denoise(self, params, qconfig, plan, latents, cond, g, key, *, cfg):
        def body(i, x):
            return self.sample_step(params, qconfig, plan, i, x, cond, g, key, cfg=cfg)[0]

        x = latents * plan.init_noise_sigma
        return jax.lax.fori_loop(0, plan.num_inference_steps, body, x)

    # ----------------------------------------------------------------- decoding
    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents -> images [B, H, W, 3] in [0, 1] (float32)."""
        fn = self._cache.get("decode")
        if fn is None:
            fn = self._cache["decode"] = jax.jit(self._decode)
        return fn(self.params["vae"], latents)

    def _decode(self, params, latents):
        cfg = self.vae.config
        z = latents.astype(jnp.float32) / cfg.scaling_factor
        if cfg.shift_factor is not None:
            z = z + cfg.shift_factor
        image = self.vae.apply({"params": params}, z.astype(self.vae.dtype), method="decode")
        image = jnp.clip(image.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
        return jnp.transpose(image, (0, 2, 3, 1))

    # ----------------------------------------------------------------- the call
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        height: int = 512,
        width: int = 512,
        latents: Any = None,
        seed: int = 0,
        output_type: str = "np",
    ):
        """Generate images for a prompt or a batch of prompts, as diffusers' pipeline call.

        ``latents`` (NCHW, unscaled standard normal as in diffusers) overrides the seed's draw;
        the seed still drives ancestral/LCM step noise. Returns float ``[B, H, W, 3]`` in
        [0, 1] for ``output_type="np"`` or a list of PIL images for ``"pil"``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: at least one prompt is needed")
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r}")
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor}, got {height}x{width}"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        context, pooled = self.prompt_embeddings(prompts, negative_prompt, guidance_scale)
        key_latents, key_noise = seed_keys(seed)
        shape = (len(prompts), self.unet.config.in_channels, height // factor, width // factor)
        if latents is None:
            latents = jax.random.normal(key_latents, shape, jnp.float32)
        else:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        out = self.denoise(
            latents,
            context,
            pooled,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            noise_key=key_noise,
            qconfig=self.qconfig,
        )
        if output_type == "latent":
            return np.asarray(out)
        images = np.asarray(self.decode(out))
        if output_type == "pil":
            return to_pil(images)
        return images

    def prompt_embeddings(
        self,
        prompts: Sequence[str],
        negative_prompt: str | Sequence[str] | None,
        guidance_scale: float,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Conditioning for the UNet; with CFG the negative half comes first, as diffusers."""
        context, pooled = self.encode_prompt(self.tokenize(prompts))
        if not self._do_cfg(guidance_scale):
            return context, pooled
        if negative_prompt is None and self.kind == "sdxl" and self.force_zeros_for_empty_prompt:
            neg_context = jnp.zeros_like(context)
            neg_pooled = None if pooled is None else jnp.zeros_like(pooled)
        else:
            negative = negative_prompt if negative_prompt is not None else ""
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negatives)} entries for {len(prompts)} prompts"
                )
            neg_context, neg_pooled = self.encode_prompt(self.tokenize(negatives))
        context = jnp.concatenate([neg_context, context])
        if pooled is not None:
            pooled = jnp.concatenate([neg_pooled, pooled])
        return context, pooled

    def with_params(self, **updates: Any) -> Pipeline:
        """A copy with some component parameters replaced (compiled functions are rebuilt)."""
        return replace(self, params={**self.params, **updates}, _cache={})

    def with_quantization(self, unet_context: UNetContext, qconfig: Any) -> Pipeline:
        """A copy whose UNet runs under ``unet_context(qconfig)`` (e.g. fake quantization)."""
        return replace(self, unet_context=unet_context, qconfig=qconfig, _cache={})


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(key for the initial latents, key for step noise); step ``i`` uses ``fold_in(key, i)``."""
    key_latents, key_noise = jax.random.split(jax.random.key(seed))
    return key_latents, key_noise


def guidance_scale_embedding(w: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding of the guidance scale for LCM-distilled UNets (as diffusers)."""
    w = w * 1000.0
    half = dim // 2
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(np.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def to_pil(images: np.ndarray) -> list:
    """Float [B, H, W, 3] in [0, 1] -> PIL images, rounding as diffusers does."""
    from PIL import Image  # noqa: PLC0415

    arr = (np.asarray(images) * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


# --------------------------------------------------------------------------------- loading
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
    return jax.tree_util.tree_map(
        jnp.asarray,
        torch_to_flax(state, target, sources=sources, what=f"{folder.name}/{name}", dtype=dtype),
    )


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
    kind = _PIPELINES.get(index.get("_class_name", ""))
    if kind is None:
        raise CheckpointError(
            f"{folder}/model_index.json: pipeline class {index.get('_class_name')!r} is not "
            f"supported (supported: {', '.join(_PIPELINES)})"
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


def resolve_model(model: str | os.PathLike) -> Path:
    """A ``--model`` argument as a folder: ``"testbed"``, a local folder, or a cached repo id."""
    if str(model) == "testbed":
        from mixdq_jax.testbed import testbed_path  # noqa: PLC0415

        return testbed_path()
    return resolve_model_path(model)


def load_pipeline(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    variant: str | None = None,
    scheduler: str | Mapping[str, Any] | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    allow_pickle: bool = False,
    quant: Any = None,
    calib: Any = None,
) -> Pipeline:
    """Load a diffusers SDXL or SD1.x/2.x pipeline folder (or a cached repo id) into JAX.

    ``"testbed"`` loads the small trained model shipped inside the package.
    ``scheduler`` replaces the folder's scheduler: a class name (the folder's config is reused,
    as ``LCMScheduler.from_config(pipe.scheduler.config)``) or a full config dict. ``lora`` is a
    LoRA safetensors file fused into the weights with ``lora_scale``. ``quant`` is a
    :class:`mixdq_jax.quant.QuantSpec` applied to the UNet (fake quantization); ``calib`` is the
    calibration run directory (or ranges mapping) that quantized activations need.
    """
    folder = resolve_model(path_or_repo_id)
    if (folder / "unet" / "mixdq_quant.json").is_file():  # a `mixdq export` folder
        from mixdq_jax.deploy import load_quantized_pipeline  # noqa: PLC0415

        return load_quantized_pipeline(
            folder,
            dtype=dtype,
            variant=variant,
            scheduler=scheduler,
            lora=lora,
            lora_scale=lora_scale,
            allow_pickle=allow_pickle,
            quant=quant,
            calib=calib,
        )
    parts = load_components(
        folder, dtype=dtype, variant=variant, allow_pickle=allow_pickle, lora=lora,
        lora_scale=lora_scale,
    )  # fmt: skip
    pipe = Pipeline(
        kind=parts.kind,
        unet=parts.unet,
        vae=parts.vae,
        text=parts.text,
        scheduler=make_scheduler(scheduler_config(folder, scheduler)),
        params=parts.params,
        force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt,
        source=str(folder),
    )
    if quant is not None:
        from mixdq_jax.quant import quantize_pipeline  # noqa: PLC0415  (quant imports pipeline)

        pipe = quantize_pipeline(pipe, quant, calib=calib)
    return pipe
