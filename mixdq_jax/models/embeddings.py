"""Timestep embeddings of the diffusers UNet: sinusoidal projection + two-layer MLP."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.models.resnet import get_activation

Dtype = jnp.dtype


def _frequencies(half_dim: int, freq_shift: float, max_period: float) -> np.ndarray:
    """exp(-log(max_period) * i / (half_dim - shift)) in float32, as torch computes it."""
    exponent = (-math.log(max_period) * np.arange(half_dim, dtype=np.float32)).astype(np.float32)
    exponent = (exponent / np.float32(half_dim - freq_shift)).astype(np.float32)
    return np.exp(exponent.astype(np.float64)).astype(np.float32)


def get_timestep_embedding(
    timesteps: jax.Array,
    embedding_dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """diffusers `get_timestep_embedding`: [N] timesteps -> [N, embedding_dim] float32.

    Order is [sin, cos], or [cos, sin] with `flip_sin_to_cos`; odd dims get a zero column.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {timesteps.shape}")
    half_dim = embedding_dim // 2
    freqs = jnp.asarray(_frequencies(half_dim, freq_shift, max_period))
    emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = scale * emb
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers `TimestepEmbedding`: `linear_1` -> act -> `linear_2` (-> post act).

    `cond_proj_dim` adds the bias-free `cond_proj` of LCM-distilled UNets, applied to the
    optional `condition` and added to the input.
    """

    time_embed_dim: int
    act_fn: str | None = "silu"
    out_dim: int | None = None
    post_act_fn: str | None = None
    cond_proj_dim: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, condition: jax.Array | None = None) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        if self.cond_proj_dim is not None:
            proj = nn.Dense(
                sample.shape[-1], use_bias=False, dtype=dt, param_dtype=pdt, name="cond_proj"
            )
            if condition is not None:
                sample = sample + proj(condition)
            elif self.is_initializing():
                proj(jnp.zeros(sample.shape[:-1] + (self.cond_proj_dim,), sample.dtype))
        elif condition is not None:
            raise ValueError("a timestep condition was given but the model has no cond_proj")
        sample = nn.Dense(self.time_embed_dim, dtype=dt, param_dtype=pdt, name="linear_1")(sample)
        if self.act_fn is not None:
            sample = get_activation(self.act_fn)(sample)
        out_dim = self.out_dim or self.time_embed_dim
        sample = nn.Dense(out_dim, dtype=dt, param_dtype=pdt, name="linear_2")(sample)
        if self.post_act_fn is not None:
            sample = get_activation(self.post_act_fn)(sample)
        return sample
