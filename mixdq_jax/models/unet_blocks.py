"""Down, mid and up blocks of the diffusers UNet2DConditionModel and AutoencoderKL, NHWC.

Each block is named like its diffusers class and holds submodules named `resnets.{i}`,
`attentions.{i}`, `downsamplers.0`, `upsamplers.0`. Blocks with cross-attention take
`context` (the encoder hidden states); the others ignore it, so the UNet calls all alike.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixdq_jax.models.attention import Attention, Transformer2DModel
from mixdq_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D

Dtype = jnp.dtype


class DownBlock2D(nn.Module):
    """Resnets, then an optional stride-2 downsampler; returns (hidden, skip states)."""

    in_channels: int
    out_channels: int
    temb_channels: int
    num_layers: int
    groups: int
    eps: float
    act_fn: str = "silu"
    add_downsample: bool = True
    downsample_padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.in_channels if i == 0 else self.out_channels,
                self.out_channels,
                self.temb_channels,
                self.groups,
                self.eps,
                self.act_fn,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"resnets.{i}",
            )(x, temb)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels,
                self.downsample_padding,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="downsamplers.0",
            )(x)
            skips.append(x)
        return x, tuple(skips)


class CrossAttnDownBlock2D(nn.Module):
    """(Resnet, Transformer2DModel) pairs, then an optional downsampler."""

    in_channels: int
    out_channels: int
    temb_channels: int
    num_layers: int
    transformer_layers: tuple[int, ...]
    heads: int
    groups: int
    eps: float
    use_linear_projection: bool
    act_fn: str = "silu"
    add_downsample: bool = True
    downsample_padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        dt, pdt = self.dtype, self.param_dtype
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                self.in_channels if i == 0 else self.out_channels,
                self.out_channels,
                self.temb_channels,
                self.groups,
                self.eps,
                self.act_fn,
                dtype=dt,
                param_dtype=pdt,
                name=f"resnets.{i}",
            )(x, temb)
            x = Transformer2DModel(
                self.heads,
                self.out_channels // self.heads,
                self.transformer_layers[i],
                self.groups,
                self.use_linear_projection,
                dtype=dt,
                param_dtype=pdt,
                name=f"attentions.{i}",
            )(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels,
                self.downsample_padding,
                dtype=dt,
                param_dtype=pdt,
                name="downsamplers.0",
            )(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nn.Module):
    """Resnet, then (Transformer2DModel, Resnet) x num_layers at constant width."""

    channels: int
    temb_channels: int
    transformer_layers: tuple[int, ...]
    heads: int
    groups: int
    eps: float
    use_linear_projection: bool
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    num_layers: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array | None = None
    ) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype

        def resnet(i: int) -> ResnetBlock2D:
            return ResnetBlock2D(
                self.channels,
                self.channels,
                self.temb_channels,
                self.groups,
                self.eps,
                self.act_fn,
                self.output_scale_factor,
                dtype=dt,
                param_dtype=pdt,
                name=f"resnets.{i}",
            )

        x = resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = Transformer2DModel(
                self.heads,
                self.channels // self.heads,
                self.transformer_layers[i],
                self.groups,
                self.use_linear_projection,
                dtype=dt,
                param_dtype=pdt,
                name=f"attentions.{i}",
            )(x, context)
            x = resnet(i + 1)(x, temb)
        return x


class UNetMidBlock2D(nn.Module):
    """Resnet, then ([VAE self-attention], Resnet) x num_layers.

    The VAE uses it with `temb_channels=None`, one layer and single-head attention over all
    channels; the UNet's `mid_block_type="UNetMidBlock2D"` uses it with no layers.
    """

    channels: int
    temb_channels: int | None
    groups: int
    eps: float
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    num_layers: int = 1
    add_attention: bool = True
    attention_head_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array | None = None, context: jax.Array | None = None
    ) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype

        def resnet(i: int) -> ResnetBlock2D:
            return ResnetBlock2D(
                self.channels,
                self.channels,
                self.temb_channels,
                self.groups,
                self.eps,
                self.act_fn,
                self.output_scale_factor,
                dtype=dt,
                param_dtype=pdt,
                name=f"resnets.{i}",
            )

        x = resnet(0)(x, temb)
        head_dim = self.attention_head_dim or self.channels
        for i in range(self.num_layers):
            if self.add_attention:
                b, h, w, c = x.shape
                x = Attention(
                    heads=c // head_dim,
                    dim_head=head_dim,
                    bias=True,
                    norm_num_groups=self.groups,
                    eps=self.eps,
                    residual_connection=True,
                    rescale_output_factor=self.output_scale_factor,
                    dtype=dt,
                    param_dtype=pdt,
                    name=f"attentions.{i}",
                )(x.reshape(b, h * w, c)).reshape(b, h, w, c)
            x = resnet(i + 1)(x, temb)
        return x


class UpBlock2D(nn.Module):
    """Resnets over [hidden, skip] concatenations, then an optional upsampler.

    Resnet input widths follow the concatenation; each `conv_shortcut` is a plain 1x1 Conv on the
    concatenated tensor (MixDQ's shortcut-split quantization intercepts exactly that call).
    """

    out_channels: int
    temb_channels: int
    num_layers: int
    groups: int
    eps: float
    act_fn: str = "silu"
    add_upsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        skips = list(skips)
        for i in range(self.num_layers):
            skip = skips.pop()
            x = jnp.concatenate([x, skip], axis=-1)
            x = ResnetBlock2D(
                x.shape[-1],
                self.out_channels,
                self.temb_channels,
                self.groups,
                self.eps,
                self.act_fn,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"resnets.{i}",
            )(x, temb)
        if self.add_upsample:
            x = Upsample2D(
                self.out_channels,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="upsamplers.0",
            )(x, upsample_size)
        return x


class CrossAttnUpBlock2D(nn.Module):
    """(Resnet over [hidden, skip], Transformer2DModel) pairs, then an optional upsampler."""

    out_channels: int
    temb_channels: int
    num_layers: int
    transformer_layers: tuple[int, ...]
    heads: int
    groups: int
    eps: float
    use_linear_projection: bool
    act_fn: str = "silu"
    add_upsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array | None = None,
        upsample_size: tuple[int, int] | None = None,
    ) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        skips = list(skips)
        for i in range(self.num_layers):
            skip = skips.pop()
            x = jnp.concatenate([x, skip], axis=-1)
            x = ResnetBlock2D(
                x.shape[-1],
                self.out_channels,
                self.temb_channels,
                self.groups,
                self.eps,
                self.act_fn,
                dtype=dt,
                param_dtype=pdt,
                name=f"resnets.{i}",
            )(x, temb)
            x = Transformer2DModel(
                self.heads,
                self.out_channels // self.heads,
                self.transformer_layers[i],
                self.groups,
                self.use_linear_projection,
                dtype=dt,
                param_dtype=pdt,
                name=f"attentions.{i}",
            )(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=dt, param_dtype=pdt, name="upsamplers.0")(
                x, upsample_size
            )
        return x


def _time_free_resnets(block: nn.Module, x: jax.Array) -> jax.Array:
    """The VAE blocks' ``resnets.{i}`` (no time embedding), created in ``block``'s scope."""
    for i in range(block.num_layers):
        x = ResnetBlock2D(
            block.in_channels if i == 0 else block.out_channels,
            block.out_channels,
            None,
            block.groups,
            block.eps,
            block.act_fn,
            dtype=block.dtype,
            param_dtype=block.param_dtype,
            parent=block,
            name=f"resnets.{i}",
        )(x)
    return x


class DownEncoderBlock2D(nn.Module):
    """VAE encoder block: time-free resnets, then an optional downsampler (padding 0)."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    eps: float = 1e-6
    act_fn: str = "silu"
    add_downsample: bool = True
    downsample_padding: int = 0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _time_free_resnets(self, x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels,
                self.downsample_padding,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="downsamplers.0",
            )(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """VAE decoder block: time-free resnets, then an optional upsampler."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    eps: float = 1e-6
    act_fn: str = "silu"
    add_upsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _time_free_resnets(self, x)
        if self.add_upsample:
            x = Upsample2D(
                self.out_channels,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="upsamplers.0",
            )(x)
        return x
