"""UNet2DConditionModel (SD1.x/2.x, SDXL) in Flax linen, built from a diffusers config.json.

`UNetConfig` holds the diffusers config keys with diffusers' defaults and refuses values this
port does not implement (ValueError naming the key), so a checkpoint never runs as a silently
different model. The module's parameter paths joined with "." are the diffusers module names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixdq_jax.models.embeddings import TimestepEmbedding, get_timestep_embedding
from mixdq_jax.models.resnet import conv2d, get_activation, group_norm
from mixdq_jax.models.unet_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
)

Dtype = jnp.dtype

_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)


def _tuplify(value: Any) -> Any:
    """JSON lists -> tuples (recursively) so the frozen config is hashable."""
    if isinstance(value, list | tuple):
        return tuple(_tuplify(v) for v in value)
    return value


def _strip_unet_res(block_type: str) -> str:
    # diffusers accepts a "UNetRes" prefix on block type names and drops it.
    return block_type[7:] if block_type.startswith("UNetRes") else block_type


def _reject(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"UNet config {key}={value!r} is not supported: {why}")


@dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """The diffusers `UNet2DConditionModel` config keys, with diffusers' defaults.

    Accepted but without effect, exactly as in diffusers for the supported block types:
    `dropout` (inference only), `upcast_attention` (scores are always float32 here),
    `resnet_skip_time_act` and `resnet_out_scale_factor` (only read by ResnetDownsample/Simple
    blocks), `mid_block_only_cross_attention` (only UNetMidBlock2DSimpleCrossAttn),
    `addition_embed_type_num_heads` (only addition_embed_type="text"), `sample_size` (metadata).
    """

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int | tuple[int, ...], ...] = 1
    reverse_transformer_layers_per_block: tuple[tuple[int, ...], ...] | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool | None = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UNetConfig:
        """From a diffusers config dict; skips `_`-prefixed metadata and the
        ``quantization_config`` of a quantized export, fails on unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {
            k: _tuplify(v)
            for k, v in config.items()
            if not k.startswith("_") and k != "quantization_config"
        }
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown UNet config key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> UNetConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data)

    def __post_init__(self) -> None:
        n = len(self.down_block_types)
        for t in self.down_block_types:
            if _strip_unet_res(t) not in _DOWN_TYPES:
                raise _reject("down_block_types", t, f"supported block types are {_DOWN_TYPES}")
        for t in self.up_block_types:
            if _strip_unet_res(t) not in _UP_TYPES:
                raise _reject("up_block_types", t, f"supported block types are {_UP_TYPES}")
        if self.mid_block_type not in _MID_TYPES:
            raise _reject("mid_block_type", self.mid_block_type, f"supported: {_MID_TYPES}")
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(
                "UNet config: down_block_types, up_block_types and block_out_channels must have "
                f"the same length, got {self.down_block_types}, {self.up_block_types}, "
                f"{self.block_out_channels}"
            )
        for key in (
            "attention_head_dim",
            "cross_attention_dim",
            "layers_per_block",
            "transformer_layers_per_block",
            "only_cross_attention",
        ):
            value = getattr(self, key)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"UNet config {key}={value!r} needs one entry per block ({n})")
        if self.num_attention_heads is not None:
            raise _reject(
                "num_attention_heads",
                self.num_attention_heads,
                "diffusers' UNet2DConditionModel refuses it too; heads come from "
                "attention_head_dim (a historical misnomer for the number of heads)",
            )
        ocs = self.only_cross_attention
        if any(ocs) if isinstance(ocs, tuple) else ocs:
            raise _reject("only_cross_attention", ocs, "only False is implemented")
        fixed = {
            "dual_cross_attention": False,
            "class_embed_type": None,
            "num_class_embeds": None,
            "class_embeddings_concat": False,
            "encoder_hid_dim": None,
            "encoder_hid_dim_type": None,
            "resnet_time_scale_shift": "default",
            "time_embedding_type": "positional",
            "attention_type": "default",
            "cross_attention_norm": None,
        }
        for key, allowed in fixed.items():
            if getattr(self, key) != allowed:
                raise _reject(key, getattr(self, key), f"only {allowed!r} is implemented")
        if self.addition_embed_type not in (None, "text_time"):
            raise _reject(
                "addition_embed_type",
                self.addition_embed_type,
                "only None and 'text_time' are implemented",
            )
        if self.addition_embed_type == "text_time" and (
            self.addition_time_embed_dim is None
            or self.projection_class_embeddings_input_dim is None
        ):
            raise ValueError(
                "UNet config addition_embed_type='text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )
        if self.norm_num_groups is None:
            raise _reject("norm_num_groups", None, "the resnet blocks need group norm")
        for key in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
            if getattr(self, key) is not None:
                try:
                    get_activation(getattr(self, key))
                except ValueError as e:
                    raise _reject(key, getattr(self, key), str(e)) from None
        tl = self.transformer_layers_per_block
        if (
            isinstance(tl, tuple)
            and any(isinstance(t, tuple) for t in tl)
            and self.reverse_transformer_layers_per_block is None
        ):
            raise ValueError(
                "UNet config: per-layer transformer_layers_per_block needs "
                "reverse_transformer_layers_per_block (as in diffusers)"
            )
        for k in ("conv_in_kernel", "conv_out_kernel"):
            if getattr(self, k) % 2 != 1:
                raise _reject(k, getattr(self, k), "only odd kernels keep the spatial size")

    # Per-block values, the way diffusers expands scalars.
    def per_block(self, key: str) -> tuple:
        value = getattr(self, key)
        return value if isinstance(value, tuple) else (value,) * len(self.down_block_types)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1


def _expand_layers(value: int | tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    return (value,) * num_layers if isinstance(value, int) else tuple(value)


class UNet2DConditionModel(nn.Module):
    """diffusers `UNet2DConditionModel` forward pass: NCHW in, NCHW noise prediction out.

    `apply({"params": p}, sample, timesteps, encoder_hidden_states, added_cond_kwargs=...)`;
    timesteps may be a scalar or [B]; `added_cond_kwargs` holds `text_embeds` [B, D] and
    `time_ids` [B, n] for addition_embed_type="text_time"; `timestep_cond` feeds
    `time_embedding.cond_proj` of LCM-distilled UNets. Computation is NHWC inside.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        encoder_hidden_states: jax.Array,
        added_cond_kwargs: Mapping[str, jax.Array] | None = None,
        timestep_cond: jax.Array | None = None,
    ) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"sample must be NCHW with {cfg.in_channels} channels, got shape {sample.shape}"
            )
        batch, _, height, width = sample.shape
        context = jnp.asarray(encoder_hidden_states, dt)
        self._check_context(context)

        # Time embedding (sinusoids in float32, then the compute dtype, as diffusers).
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (batch,))
        c0 = cfg.block_out_channels[0]
        t_emb = get_timestep_embedding(
            t, c0, flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
        ).astype(dt)
        emb = TimestepEmbedding(
            cfg.time_embed_dim,
            cfg.act_fn,
            post_act_fn=cfg.timestep_post_act,
            cond_proj_dim=cfg.time_cond_proj_dim,
            dtype=dt,
            param_dtype=pdt,
            name="time_embedding",
        )(t_emb, None if timestep_cond is None else jnp.asarray(timestep_cond, dt))
        if cfg.addition_embed_type == "text_time":
            emb = emb + self._text_time_embedding(added_cond_kwargs, batch, emb.dtype)
        if cfg.time_embedding_act_fn is not None:
            emb = get_activation(cfg.time_embedding_act_fn)(emb)

        x = jnp.transpose(jnp.asarray(sample, dt), (0, 2, 3, 1))
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        x = conv2d(c0, cfg.conv_in_kernel, dt, pdt, "conv_in")(x)

        skips: tuple[jax.Array, ...] = (x,)
        for i in range(len(cfg.down_block_types)):
            x, res = self._down_block(i)(x, emb, context)
            skips += res

        if cfg.mid_block_type is not None:
            x = self._mid_block()(x, emb, context)

        factor = 2**cfg.num_upsamplers
        forward_upsample_size = height % factor != 0 or width % factor != 0
        for i in range(len(cfg.up_block_types)):
            block = self._up_block(i)
            n = block.num_layers
            res, skips = skips[-n:], skips[:-n]
            size = None
            if forward_upsample_size and i < len(cfg.up_block_types) - 1:
                size = tuple(skips[-1].shape[1:3])
            x = block(x, res, emb, context, size)

        x = group_norm(cfg.norm_num_groups, cfg.norm_eps, dt, pdt, "conv_norm_out")(x)
        x = get_activation(cfg.act_fn)(x)
        x = conv2d(cfg.out_channels, cfg.conv_out_kernel, dt, pdt, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2))

    def _check_context(self, context: jax.Array) -> None:
        cfg = self.config
        has_cross = any(_strip_unet_res(t).startswith("CrossAttn") for t in cfg.down_block_types)
        has_cross |= cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
        if not has_cross:
            return
        dims = set(cfg.per_block("cross_attention_dim"))
        if context.ndim != 3 or dims != {context.shape[-1]}:
            raise ValueError(
                f"encoder_hidden_states must be [B, L, {cfg.cross_attention_dim}], got shape "
                f"{context.shape}"
            )

    def _text_time_embedding(
        self, added: Mapping[str, jax.Array] | None, batch: int, dtype: Dtype
    ) -> jax.Array:
        """SDXL's `add_embedding(concat(text_embeds, add_time_proj(time_ids)))`."""
        cfg = self.config
        if not added or "text_embeds" not in added or "time_ids" not in added:
            raise ValueError(
                "addition_embed_type='text_time' needs added_cond_kwargs with 'text_embeds' "
                "and 'time_ids'"
            )
        text_embeds = jnp.asarray(added["text_embeds"])
        time_ids = jnp.asarray(added["time_ids"])
        time_embeds = get_timestep_embedding(
            time_ids.reshape(-1),
            cfg.addition_time_embed_dim,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).reshape(text_embeds.shape[0], -1)
        add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        if add_embeds.shape[-1] != cfg.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds {text_embeds.shape} + time_ids {time_ids.shape} give "
                f"{add_embeds.shape[-1]} features, config projection_class_embeddings_input_dim "
                f"is {cfg.projection_class_embeddings_input_dim}"
            )
        # diffusers' add_embedding always uses the default SiLU, whatever act_fn says.
        return TimestepEmbedding(
            cfg.time_embed_dim,
            "silu",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="add_embedding",
        )(add_embeds.astype(dtype))

    def _common(self) -> dict[str, Any]:
        cfg = self.config
        return dict(
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            act_fn=cfg.act_fn,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def _down_block(self, i: int) -> nn.Module:
        cfg = self.config
        channels = cfg.block_out_channels
        num_layers = cfg.per_block("layers_per_block")[i]
        kw = dict(
            in_channels=channels[max(i - 1, 0)],
            out_channels=channels[i],
            temb_channels=cfg.time_embed_dim,
            num_layers=num_layers,
            add_downsample=i < len(channels) - 1,
            downsample_padding=cfg.downsample_padding,
            name=f"down_blocks.{i}",
            **self._common(),
        )
        if _strip_unet_res(cfg.down_block_types[i]) == "DownBlock2D":
            return DownBlock2D(**kw)
        tl = cfg.per_block("transformer_layers_per_block")[i]
        return CrossAttnDownBlock2D(
            transformer_layers=_expand_layers(tl, num_layers),
            heads=cfg.per_block("attention_head_dim")[i],
            use_linear_projection=cfg.use_linear_projection,
            **kw,
        )

    def _mid_block(self) -> nn.Module:
        cfg = self.config
        common = self._common()
        if cfg.mid_block_type == "UNetMidBlock2D":
            # diffusers builds it for the UNet with no attention layers: a single resnet.
            return UNetMidBlock2D(
                channels=cfg.block_out_channels[-1],
                temb_channels=cfg.time_embed_dim,
                output_scale_factor=cfg.mid_block_scale_factor,
                num_layers=0,
                add_attention=False,
                name="mid_block",
                **common,
            )
        tl = cfg.per_block("transformer_layers_per_block")[-1]
        return UNetMidBlock2DCrossAttn(
            channels=cfg.block_out_channels[-1],
            temb_channels=cfg.time_embed_dim,
            transformer_layers=_expand_layers(tl, 1),
            heads=cfg.per_block("attention_head_dim")[-1],
            use_linear_projection=cfg.use_linear_projection,
            output_scale_factor=cfg.mid_block_scale_factor,
            name="mid_block",
            **common,
        )

    def _up_block(self, i: int) -> nn.Module:
        cfg = self.config
        n = len(cfg.block_out_channels)
        rev_channels = cfg.block_out_channels[::-1]
        num_layers = cfg.per_block("layers_per_block")[::-1][i] + 1
        kw = dict(
            out_channels=rev_channels[i],
            temb_channels=cfg.time_embed_dim,
            num_layers=num_layers,
            add_upsample=i < n - 1,
            name=f"up_blocks.{i}",
            **self._common(),
        )
        if _strip_unet_res(cfg.up_block_types[i]) == "UpBlock2D":
            return UpBlock2D(**kw)
        if cfg.reverse_transformer_layers_per_block is not None:
            tl = cfg.reverse_transformer_layers_per_block[i]
        else:
            tl = cfg.per_block("transformer_layers_per_block")[::-1][i]
        return CrossAttnUpBlock2D(
            transformer_layers=_expand_layers(tl, num_layers),
            heads=cfg.per_block("attention_head_dim")[::-1][i],
            use_linear_projection=cfg.use_linear_projection,
            **kw,
        )


def example_inputs(
    config: UNetConfig,
    *,
    batch: int = 1,
    height: int | None = None,
    width: int | None = None,
    seq_len: int = 77,
    num_time_ids: int = 6,
) -> dict[str, Any]:
    """Zero inputs of the right shapes for `init` / `jax.eval_shape` (keyword arguments).

    `text_embeds` width is projection_class_embeddings_input_dim minus the time-id features
    (6 time ids, as SDXL base; the refiner uses 5).
    """
    size = config.sample_size or 64
    hs, ws = size if isinstance(size, tuple) else (size, size)
    height, width = height or hs, width or ws
    ctx_dim = config.per_block("cross_attention_dim")[0]
    inputs: dict[str, Any] = {
        "sample": jnp.zeros((batch, config.in_channels, height, width), jnp.float32),
        "timesteps": jnp.zeros((batch,), jnp.float32),
        "encoder_hidden_states": jnp.zeros((batch, seq_len, ctx_dim), jnp.float32),
    }
    if config.addition_embed_type == "text_time":
        text_dim = (
            config.projection_class_embeddings_input_dim
            - num_time_ids * config.addition_time_embed_dim
        )
        inputs["added_cond_kwargs"] = {
            "text_embeds": jnp.zeros((batch, text_dim), jnp.float32),
            "time_ids": jnp.zeros((batch, num_time_ids), jnp.float32),
        }
    if config.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = jnp.zeros((batch, config.time_cond_proj_dim), jnp.float32)
    return inputs


def param_shapes(model: UNet2DConditionModel, **example_kwargs: Any) -> dict:
    """The `params` tree as `jax.ShapeDtypeStruct`s, without allocating weights."""
    inputs = example_inputs(model.config, **example_kwargs)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))["params"]
