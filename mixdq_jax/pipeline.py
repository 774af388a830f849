"""Text-to-image pipelines (SDXL and SD1.x/2.x) as jit-compiled pure functions: runtime only.

A :class:`Pipeline` (loaded by `mixdq_jax.api.load_pipeline`) has a call that mirrors
diffusers' ``pipe(prompt, ...)``. The three stages (text encoding, the whole denoising loop,
VAE decoding) are each one jitted function of (params, inputs); every UNet evaluation is
`mixdq_jax.quant.forward`. A pipeline holds no quantization state: a quantized UNet is one
value (`QuantizedUNet`: params, qconfig or layer mode, PTQD's correction) that the call
takes (``pipe(prompt, quantized=q)``; ``qconfig=qc`` fake-quantizes the pipeline's own float
UNet), so a fake-quantized model reuses the same compiled loop for every per-layer
configuration. `QuantizedPipeline` is a pipeline bound to one such value (what loading an
exported folder gives).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.compile_events import first_call
from mixdq_jax.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from mixdq_jax.models.unet import UNet2DConditionModel
from mixdq_jax.models.vae import AutoencoderKL
from mixdq_jax.quant.forward import forward
from mixdq_jax.quant.intercept import Mode
from mixdq_jax.quant.modes import default_mode
from mixdq_jax.quant.quantized import QuantizedUNet
from mixdq_jax.schedulers.noise_correction import StepCorrection
from mixdq_jax.tokenizer import CLIPTokenizer


class NonFiniteError(ValueError):
    """A pipeline stage produced NaN or inf; ``stage`` names it (``"text encoder"``,
    ``"UNet"``, ``"VAE decoder"``) so the caller can say what to change."""

    def __init__(self, message: str, *, stage: str) -> None:
        super().__init__(message)
        self.stage = stage


def check_finite(array: Any, stage: str, what: str) -> None:
    """Raise :class:`NonFiniteError` if ``array`` (the output of ``stage``) holds NaN or inf.

    One reduction and one scalar to the host: call it between jitted stages, never inside
    one (a host sync in traced code would break jit and vmap)."""
    finite = jnp.isfinite(jnp.asarray(array))
    if bool(finite.all()):
        return
    bad = int(finite.size - finite.sum())
    raise NonFiniteError(
        f"the {stage} produced {bad} non-finite value(s) (NaN/inf) of {finite.size} in {what}",
        stage=stage,
    )


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
    they can be replaced (sharded) without rebuilding the modules; ``"unet"`` is the float
    UNet (absent in the pipeline of an exported folder, whose packed UNet is a
    `QuantizedUNet`). Quantization is an argument of the call, never a field.
    """

    kind: str  # "sdxl" or "sd"
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text: tuple[TextStack, ...]
    scheduler: Any
    params: Mapping[str, Any]
    force_zeros_for_empty_prompt: bool = True
    source: str = ""
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    # ----------------------------------------------------------------- text encoding
    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, ...]:
        return tuple(stack.tokenizer(list(prompts)) for stack in self.text)

    def encode_prompt(self, ids: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array | None]:
        """(context [B, 77, D], pooled [B, P] or None) from token ids, as diffusers."""
        released = [s.name for s in self.text if s.name not in self.params]
        if released:
            raise ValueError(
                f"this pipeline's text encoders were released ({', '.join(released)}): pass "
                "prompt_embeds, or encode with the pipeline before without_text_encoders()"
            )
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
        quantized: QuantizedUNet | None = None,
    ) -> jax.Array:
        """Run the whole sampling loop (one jitted call). ``latents`` are unscaled N(0, 1).
        ``quantized`` / ``qconfig``: as in :meth:`__call__`."""
        unet = self.unet_value(qconfig, quantized)
        plan = self.scheduler.set_timesteps(num_inference_steps)
        cfg = self.uses_cfg(guidance_scale)
        mode = unet.layer_mode
        correction = self.step_correction(unet, plan)
        key = ("denoise", num_inference_steps, cfg, _mode_key(mode))
        fn = self._cache.get(key)
        if fn is None:
            fn = self._cache[key] = jax.jit(partial(self._denoise, cfg=cfg, mode=mode))
        cond = self.conditioning(context, pooled, guidance_scale, height, width)
        g = jnp.float32(guidance_scale)
        args = (unet.params, unet.qconfig, plan, latents, cond, g, noise_key, correction)
        with first_call("the UNet sampling loop", fn, *args):
            return fn(*args)

    def unet_value(
        self, qconfig: Any = None, quantized: QuantizedUNet | None = None
    ) -> QuantizedUNet:
        """The UNet a call runs: ``quantized``, or this pipeline's float UNet under
        ``qconfig`` (``None``: float)."""
        if quantized is not None:
            if qconfig is not None:
                raise ValueError(
                    "pass either quantized= (a quantized UNet with its own configuration) or "
                    "qconfig= (fake quantization of this pipeline's float UNet), not both"
                )
            if not isinstance(quantized, QuantizedUNet):
                raise ValueError(
                    f"quantized= takes a mixdq_jax.quant.QuantizedUNet, got {type(quantized)}"
                )
            return quantized
        if "unet" not in self.params:
            raise ValueError(
                f"{self.source}: this pipeline holds no float UNet (the pipeline of a quantized "
                "export): call it with quantized=, or use the QuantizedPipeline load_pipeline "
                "returned"
            )
        return QuantizedUNet(params=self.params["unet"], qconfig=qconfig)

    def step_correction(self, unet: QuantizedUNet, plan: Any) -> StepCorrection | None:
        """The per-step arrays of ``unet``'s PTQD correction on ``plan`` (None without one);
        a clear error when it was fitted on another schedule."""
        if unet.correction is None:
            return None
        return unet.correction.for_plan(self.scheduler, plan)

    def uses_cfg(self, guidance_scale: float) -> bool:
        """Classifier-free guidance doubles the UNet batch (not for guidance-embedded LCM)."""
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

    def sample_step(
        self, params, qconfig, plan, i, x, cond, g, key, correction=None, *, cfg, mode=None
    ):
        """One denoising step: ``(x_next, model_input, model_output, records)``.

        ``mode``: the UNet's layer mode (default: fake quantization by ``qconfig``, float
        without one); a collecting mode (calibration's ``Observe``) returns its per-layer
        records, else ``records`` is None. ``correction``: PTQD's (:meth:`step_correction`), on
        the guided output and the step's fresh noise; ``model_output`` stays the UNet's own.
        """
        mode = default_mode(qconfig) if mode is None else mode
        inp = jnp.concatenate([x, x]) if cfg else x
        inp = self.scheduler.scale_model_input(plan, inp, i).astype(self.unet.dtype)
        t = plan.timesteps[i]
        out = forward(self.unet, params, qconfig, inp, t, cond, mode=mode)
        out, records = out if mode.collects else (out, None)
        guided = out.astype(jnp.float32)
        if cfg:
            uncond, text = jnp.split(guided, 2)
            guided = uncond + g * (text - uncond)
        noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
        if correction is not None:
            guided, noise = correction.output(guided, i), correction.noise(noise, i)
        x_next = self.scheduler.step(plan, guided, i, x, noise).astype(x.dtype)
        return x_next, inp, out, records

    def compiled_step(self, *, cfg: bool, mode: Mode | None = None):
        """:meth:`sample_step` jitted (cached per ``cfg`` and mode): step-by-step sampling, as
        calibration runs it to keep every step's UNet input and output. ``mode``: a hashable
        mode (``Observe()``), or ``None`` for fake quantization by the ``qconfig`` argument."""
        key = ("step", cfg, mode)
        try:
            hash(key)
        except TypeError:
            raise TypeError(
                f"compiled_step: mode {type(mode).__name__} is not hashable; pass mode=None for "
                "fake quantization by the qconfig argument"
            ) from None
        fn = self._cache.get(key)
        if fn is None:
            fn = self._cache[key] = jax.jit(partial(self.sample_step, cfg=cfg, mode=mode))
        return fn

    def _denoise(self, params, qconfig, plan, latents, cond, g, key, correction, *, cfg, mode):
        def body(i, x):
            step = self.sample_step(
                params, qconfig, plan, i, x, cond, g, key, correction, cfg=cfg, mode=mode
            )
            return step[0]

        x = latents * plan.init_noise_sigma
        return jax.lax.fori_loop(0, plan.num_inference_steps, body, x)

    # ----------------------------------------------------------------- decoding
    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents -> images [B, H, W, 3] in [0, 1] (float32)."""
        fn = self._cache.get("decode")
        if fn is None:
            fn = self._cache["decode"] = jax.jit(self.decode_with)
        with first_call("the VAE decoder", fn, self.params["vae"], latents):
            return fn(self.params["vae"], latents)

    def decode_with(self, params: Any, latents: jax.Array) -> jax.Array:
        """:meth:`decode` as a pure function of the VAE params (to jit or vmap inside others)."""
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
        height: int | None = None,
        width: int | None = None,
        latents: Any = None,
        seed: int = 0,
        output_type: str = "np",
        qconfig: Any = None,
        quantized: QuantizedUNet | None = None,
        check: bool = False,
        prompt_embeds: tuple[jax.Array, jax.Array | None] | None = None,
    ):
        """Generate images for a prompt or a batch of prompts, as diffusers' pipeline call.

        ``latents`` (NCHW, unscaled standard normal as in diffusers) overrides the seed's draw;
        the seed still drives ancestral/LCM step noise. ``quantized``: the quantized UNet to run
        (`QuantizedUNet`: fake-quantized or packed params, PTQD's correction); ``qconfig``: a
        quantization config (`mixdq_jax.api.qconfig_for`) to run this pipeline's float UNet
        fake-quantized; neither: float. Returns
        float ``[B, H, W, 3]`` in [0, 1] for ``output_type="np"`` or a list of PIL images for
        ``"pil"``. ``check``: raise :class:`NonFiniteError` naming the stage (text encoder,
        UNet, VAE decoder) whose output holds NaN or inf, instead of returning a black or NaN
        image (one scalar reduction per stage, between the jitted stages). ``prompt_embeds``:
        ``(context, pooled)`` that :meth:`prompt_embeddings` gave for these prompts, negative
        prompt and guidance, so that the text encoders are not needed (see
        :meth:`without_text_encoders`).
        """
        native_h, native_w = self.image_size  # diffusers' default: sample_size x VAE factor
        height = native_h if height is None else height
        width = native_w if width is None else width
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: at least one prompt is needed")
        if output_type not in ("np", "pil", "latent"):
            raise ValueError(f"output_type must be 'np', 'pil' or 'latent', got {output_type!r}")
        factor = self.vae_scale_factor
        if height % factor or width % factor:
            raise ValueError(
                f"height and width must be multiples of {factor}, got {height}x{width}"
            )
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if prompt_embeds is None:
            prompt_embeds = self.prompt_embeddings(prompts, negative_prompt, guidance_scale)
        context, pooled = prompt_embeds
        rows = len(prompts) * (2 if self.uses_cfg(guidance_scale) else 1)
        if context.shape[0] != rows:
            raise ValueError(
                f"prompt_embeds: {context.shape[0]} rows for {len(prompts)} prompt(s) (expected "
                f"{rows}{' with the negative half' if rows > len(prompts) else ''})"
            )
        if check:
            check_finite(context, "text encoder", "the prompt embeddings")
            if pooled is not None:
                check_finite(pooled, "text encoder", "the pooled prompt embeddings")
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
            qconfig=qconfig,
            quantized=quantized,
        )
        if check:
            check_finite(out, "UNet", f"the latents after {num_inference_steps} sampling step(s)")
        if output_type == "latent":
            return np.asarray(out)
        images = self.decode(out)
        if check:
            check_finite(images, "VAE decoder", "the decoded images")
        images = np.asarray(images)
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
        if not self.uses_cfg(guidance_scale):
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

    def without_text_encoders(self) -> Pipeline:
        """A copy without the text encoders' parameters (compiled functions are rebuilt): once
        every prompt is encoded, the UNet work runs without them in memory (about 3.3 GB for
        SDXL in float32) when the caller drops this pipeline. Encoding then raises."""
        names = {s.name for s in self.text}
        return replace(
            self, params={k: v for k, v in self.params.items() if k not in names}, _cache={}
        )

    def without_unet(self) -> Pipeline:
        """A copy without the float UNet's params (the pipeline of a quantized export)."""
        return replace(self, params={k: v for k, v in self.params.items() if k != "unet"},
                       _cache={})  # fmt: skip

    @property
    def image_size(self) -> tuple[int, int]:
        """The UNet's native ``(height, width)`` in pixels: ``sample_size`` (64 when the config
        has none, as diffusers' SDXL pipeline) times the VAE factor."""
        size = self.unet.config.sample_size or 64
        h, w = size if isinstance(size, tuple) else (size, size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


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




def _mode_key(mode: Mode) -> Any:
    """A cache key of a layer mode: the mode if hashable, else its identity (a deployed mode
    holds its plan; the cached function keeps the mode alive, so the id is not reused)."""
    try:
        hash(mode)
    except TypeError:
        return (type(mode).__name__, id(mode))
    return mode


@dataclass(frozen=True)
class QuantizedPipeline:
    """A pipeline bound to one quantized UNet: ``pipe(prompt, ...)`` runs ``quantized``.

    What `mixdq_jax.api.load_pipeline` gives for an exported folder (``pipeline`` without a
    float UNet, ``quantized`` its packed UNet on the integer path and PTQD's correction).
    Attribute reads other than these fall through to ``pipeline`` (``image_size``,
    ``scheduler``, ``prompt_embeddings``, ...).
    """

    pipeline: Pipeline
    quantized: QuantizedUNet

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.pop("qconfig", None) is not None or kwargs.pop("quantized", None) is not None:
            raise ValueError(
                "this pipeline's UNet is frozen to a quantized configuration (a packed UNet); "
                "it takes no qconfig: load the float model to try other configurations"
            )
        return self.pipeline(*args, quantized=self.quantized, **kwargs)

    def denoise(self, *args: Any, **kwargs: Any) -> jax.Array:
        kwargs.pop("qconfig", None)
        return self.pipeline.denoise(*args, quantized=self.quantized, **kwargs)

    def without_text_encoders(self) -> QuantizedPipeline:
        return QuantizedPipeline(self.pipeline.without_text_encoders(), self.quantized)

    def with_params(self, **updates: Any) -> QuantizedPipeline:
        return QuantizedPipeline(self.pipeline.with_params(**updates), self.quantized)

    def with_quantized(self, quantized: QuantizedUNet) -> QuantizedPipeline:
        return QuantizedPipeline(self.pipeline, quantized)

    def __getattr__(self, name: str) -> Any:
        if name in ("pipeline", "quantized"):  # not set yet (copying, unpickling)
            raise AttributeError(name)
        return getattr(self.pipeline, name)
