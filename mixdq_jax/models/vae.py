"""AutoencoderKL (the SD/SDXL VAE) in Flax linen, built from a diffusers config.json.

`encode` gives the latent Gaussian's (mean, logvar) as diffusers' DiagonalGaussianDistribution
(logvar clamped to [-30, 20]); `decode` maps latents back to images. Both take and return NCHW.
The VAE stays in float; it is not quantized.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.models.resnet import conv2d, get_activation, group_norm
from mixdq_jax.models.unet_blocks import DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D

Dtype = jnp.dtype


def _reject(key: str, value: Any, why: str) -> ValueError:
    return ValueError(f"VAE config {key}={value!r} is not supported: {why}")


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """The diffusers `AutoencoderKL` config keys, with diffusers' defaults.

    `scaling_factor`, `shift_factor`, `latents_mean/std`, `force_upcast` and `sample_size` are
    pipeline metadata (the pipeline scales latents; this module does not).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> VAEConfig:
        """From a diffusers config dict; skips `_`-prefixed metadata, fails on unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in config.items()
            if not k.startswith("_")
        }
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown VAE config key(s): {', '.join(unknown)}")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path) -> VAEConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data)

    def __post_init__(self) -> None:
        n = len(self.block_out_channels)
        for t in self.down_block_types:
            if t != "DownEncoderBlock2D":
                raise _reject("down_block_types", t, "only DownEncoderBlock2D is implemented")
        for t in self.up_block_types:
            if t != "UpDecoderBlock2D":
                raise _reject("up_block_types", t, "only UpDecoderBlock2D is implemented")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                "VAE config: down_block_types, up_block_types and block_out_channels must have "
                "the same length"
            )
        if not isinstance(self.layers_per_block, int):
            raise _reject("layers_per_block", self.layers_per_block, "must be an int")
        try:
            get_activation(self.act_fn)
        except ValueError as e:
            raise _reject("act_fn", self.act_fn, str(e)) from None


class Encoder(nn.Module):
    """diffusers VAE `Encoder` (double_z): image NHWC -> 2*latent_channels moments NHWC."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        ch = cfg.block_out_channels
        x = conv2d(ch[0], 3, dt, pdt, "conv_in")(x)
        for i in range(len(ch)):
            x = DownEncoderBlock2D(
                ch[max(i - 1, 0)],
                ch[i],
                cfg.layers_per_block,
                cfg.norm_num_groups,
                act_fn=cfg.act_fn,
                add_downsample=i < len(ch) - 1,
                dtype=dt,
                param_dtype=pdt,
                name=f"down_blocks.{i}",
            )(x)
        x = UNetMidBlock2D(
            ch[-1],
            None,
            cfg.norm_num_groups,
            1e-6,
            cfg.act_fn,
            add_attention=cfg.mid_block_add_attention,
            attention_head_dim=ch[-1],
            dtype=dt,
            param_dtype=pdt,
            name="mid_block",
        )(x)
        x = group_norm(cfg.norm_num_groups, 1e-6, dt, pdt, "conv_norm_out")(x)
        x = get_activation(cfg.act_fn)(x)
        return conv2d(2 * cfg.latent_channels, 3, dt, pdt, "conv_out")(x)


class Decoder(nn.Module):
    """diffusers VAE `Decoder` (group norm): latents NHWC -> image NHWC."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        rev = cfg.block_out_channels[::-1]
        x = conv2d(rev[0], 3, dt, pdt, "conv_in")(z)
        x = UNetMidBlock2D(
            rev[0],
            None,
            cfg.norm_num_groups,
            1e-6,
            cfg.act_fn,
            add_attention=cfg.mid_block_add_attention,
            attention_head_dim=rev[0],
            dtype=dt,
            param_dtype=pdt,
            name="mid_block",
        )(x)
        for i in range(len(rev)):
            x = UpDecoderBlock2D(
                rev[max(i - 1, 0)],
                rev[i],
                cfg.layers_per_block + 1,
                cfg.norm_num_groups,
                act_fn=cfg.act_fn,
                add_upsample=i < len(rev) - 1,
                dtype=dt,
                param_dtype=pdt,
                name=f"up_blocks.{i}",
            )(x)
        x = group_norm(cfg.norm_num_groups, 1e-6, dt, pdt, "conv_norm_out")(x)
        x = get_activation(cfg.act_fn)(x)
        return conv2d(cfg.out_channels, 3, dt, pdt, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`: `encode(x) -> (mean, logvar)`, `decode(z) -> image`, NCHW.

    `__call__(x)` (used by `init`) encodes and decodes the mean so every parameter is created:
    `vae.init(rng, images)` or `jax.eval_shape` of it, then `vae.apply(v, x, method="encode")`.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        self.encoder = Encoder(cfg, dtype=dt, param_dtype=pdt)
        self.decoder = Decoder(cfg, dtype=dt, param_dtype=pdt)
        lc = cfg.latent_channels
        self.quant_conv = conv2d(2 * lc, 1, dt, pdt, "quant_conv") if cfg.use_quant_conv else None
        self.post_quant_conv = (
            conv2d(lc, 1, dt, pdt, "post_quant_conv") if cfg.use_post_quant_conv else None
        )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B, C, H, W] -> (mean, logvar) [B, latent_channels, H/f, W/f]."""
        h = self.encoder(jnp.transpose(jnp.asarray(x, self.dtype), (0, 2, 3, 1)))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = jnp.transpose(h, (0, 3, 1, 2))
        mean, logvar = jnp.split(h, 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents [B, latent_channels, h, w] (unscaled) -> images [B, C, h*f, w*f]."""
        z = jnp.transpose(jnp.asarray(z, self.dtype), (0, 2, 3, 1))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return jnp.transpose(self.decoder(z), (0, 3, 1, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean, _ = self.encode(x)
        return self.decode(mean)


_LEGACY_ATTN = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTN_LINEAR = re.compile(r"^.*\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_RENAME = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def legacy_vae_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename old VAE attention keys (query/key/value/proj_attn) to diffusers' current names.

    Mirrors diffusers' load-time fix for deprecated attention blocks, and squeezes attention
    weights stored as 1x1 convs ([C, C, 1, 1]) to Linear [C, C]. Other keys pass unchanged.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        m = _LEGACY_ATTN.match(key)
        if m:
            key = f"{m.group(1)}.{_RENAME[m.group(2)]}.{m.group(3)}"
        if _ATTN_LINEAR.match(key) and np.ndim(value) == 4:
            value = np.asarray(value)[:, :, 0, 0]
        if key in out:
            raise ValueError(f"VAE state dict holds both the legacy and current name of {key}")
        out[key] = value
    return out


def param_shapes(model: AutoencoderKL, *, height: int = 64, width: int = 64) -> dict:
    """The VAE `params` tree as `jax.ShapeDtypeStruct`s, without allocating weights."""
    x = jnp.zeros((1, model.config.in_channels, height, width), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
