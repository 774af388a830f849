"""Residual and resampling blocks of the diffusers UNet and VAE, NHWC.

Module names follow diffusers (`conv1`, `time_emb_proj`, `conv_shortcut`, `conv`) so a Flax path
joined with "." is the PyTorch module name and weights convert without special cases.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = jnp.dtype

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
    "relu": nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation diffusers' `get_activation(name)` returns (exact erf GELU, as torch)."""
    try:
        return _ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; known: {sorted(_ACTIVATIONS)}"
        ) from None


def group_norm(
    groups: int, eps: float, dtype: Dtype, param_dtype: Dtype, name: str
) -> nn.GroupNorm:
    """torch.nn.GroupNorm(affine=True); two-pass variance for parity with torch."""
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        name=name,
    )


def conv2d(
    features: int,
    kernel: int,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    *,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> nn.Conv:
    """torch.nn.Conv2d with symmetric padding `(kernel - 1) // 2` unless given."""
    if padding is None:
        padding = (kernel - 1) // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` (time_embedding_norm="default", pre-norm, no up/down).

    `temb_channels=None` drops `time_emb_proj` (the VAE). The 1x1 `conv_shortcut` is a plain Conv
    applied to the block input, which for up blocks is the concatenation [hidden, skip].
    """

    in_channels: int
    out_channels: int
    temb_channels: int | None
    groups: int
    eps: float
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    groups_out: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = get_activation(self.act_fn)
        dt, pdt = self.dtype, self.param_dtype
        h = act(group_norm(self.groups, self.eps, dt, pdt, "norm1")(x))
        h = conv2d(self.out_channels, 3, dt, pdt, "conv1")(h)
        if self.temb_channels is not None:
            if temb is None:
                raise ValueError("ResnetBlock2D with temb_channels needs a time embedding")
            t = nn.Dense(self.out_channels, dtype=dt, param_dtype=pdt, name="time_emb_proj")(
                act(temb)
            )
            h = h + t[:, None, None, :]
        groups_out = self.groups if self.groups_out is None else self.groups_out
        h = act(group_norm(groups_out, self.eps, dt, pdt, "norm2")(h))
        h = conv2d(self.out_channels, 3, dt, pdt, "conv2")(h)
        if self.in_channels != self.out_channels:
            x = conv2d(self.out_channels, 1, dt, pdt, "conv_shortcut")(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """diffusers `Downsample2D(use_conv=True)`: stride-2 3x3 conv.

    padding=0 is the VAE encoder's asymmetric (0, 1) right/bottom pad, as diffusers does.
    """

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv2d(
            self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2, padding=pad
        )(x)


def _nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source rows of torch's `F.interpolate(mode="nearest", size=...)` (float32 scale, floor)."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) >> 1
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
    """Nearest-neighbour upsampling of NHWC `x`: 2x, or to `size` as torch does."""
    _, h, w, _ = x.shape
    if size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows, cols = _nearest_indices(h, size[0]), _nearest_indices(w, size[1])
    return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
    """diffusers `Upsample2D(use_conv=True)`: nearest 2x (or to `output_size`) then 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        x = upsample_nearest(x, output_size)
        return conv2d(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)
