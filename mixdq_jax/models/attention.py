"""Attention, GEGLU feed-forward and the spatial transformer of the diffusers UNet, NHWC.

The score computation (`scaled_dot_product_attention`) is a plain function, not a Dense, so
quantization that intercepts Dense/Conv calls sees only the projections (`to_q`, `to_k`, `to_v`,
`to_out.0`), never the QK^T / PV matmuls.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixdq_jax.models.resnet import conv2d, group_norm

Dtype = jnp.dtype


def scaled_dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, heads: int, scale: float
) -> jax.Array:
    """softmax(q k^T * scale) v per head; [B, Lq, H*D] x [B, Lk, H*D] -> [B, Lq, H*D].

    Scores and softmax run in float32 whatever the compute dtype (as torch's SDPA on CPU and
    diffusers' `upcast_attention` / `upcast_softmax`), the result is cast back to `v.dtype`.
    """
    b, lq, inner = q.shape
    lk = k.shape[1]
    d = inner // heads
    qh = q.reshape(b, lq, heads, d).astype(jnp.float32)
    kh = k.reshape(b, lk, heads, d).astype(jnp.float32)
    vh = v.reshape(b, lk, heads, d)
    scores = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) * scale
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, vh.astype(jnp.float32))
    return out.reshape(b, lq, inner).astype(v.dtype)


class Attention(nn.Module):
    """diffusers `Attention` with the default processor, on token sequences [B, L, C].

    `to_k`/`to_v` read `context` (cross-attention) or the queries' own input. The VAE variant
    (`norm_num_groups`, `residual_connection`, `bias=True`) group-normalises the tokens first
    and adds the input back, as diffusers' converted legacy attention block.
    """

    heads: int
    dim_head: int
    bias: bool = False
    out_bias: bool = True
    norm_num_groups: int | None = None
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        inner = self.heads * self.dim_head
        residual = x
        if self.norm_num_groups is not None:
            x = group_norm(self.norm_num_groups, self.eps, dt, pdt, "group_norm")(x)
        q = nn.Dense(inner, use_bias=self.bias, dtype=dt, param_dtype=pdt, name="to_q")(x)
        kv_in = x if context is None else context
        k = nn.Dense(inner, use_bias=self.bias, dtype=dt, param_dtype=pdt, name="to_k")(kv_in)
        v = nn.Dense(inner, use_bias=self.bias, dtype=dt, param_dtype=pdt, name="to_v")(kv_in)
        out = scaled_dot_product_attention(q, k, v, self.heads, self.dim_head**-0.5)
        out = nn.Dense(
            residual.shape[-1], use_bias=self.out_bias, dtype=dt, param_dtype=pdt, name="to_out.0"
        )(out)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class GEGLU(nn.Module):
    """diffusers `GEGLU`: `proj` to 2*inner, split into (hidden, gate), hidden * gelu(gate)."""

    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(
            2 * self.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
        )(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu", mult=4)`: `net.0` (GEGLU) -> `net.2`."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = int(self.dim * self.mult)
        h = GEGLU(inner, dtype=self.dtype, param_dtype=self.param_dtype, name="net.0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net.2")(h)


class BasicTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock` (layer_norm): self-attn, cross-attn, GEGLU FF."""

    dim: int
    heads: int
    dim_head: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(
                epsilon=self.norm_eps, dtype=dt, param_dtype=pdt, use_fast_variance=False, name=name
            )

        def attn(name: str) -> Attention:
            return Attention(self.heads, self.dim_head, dtype=dt, param_dtype=pdt, name=name)

        x = attn("attn1")(norm("norm1")(x)) + x
        x = attn("attn2")(norm("norm2")(x), context) + x
        return FeedForward(self.dim, dtype=dt, param_dtype=pdt, name="ff")(norm("norm3")(x)) + x


class Transformer2DModel(nn.Module):
    """diffusers `Transformer2DModel` on continuous NHWC input.

    GroupNorm(eps 1e-6) -> `proj_in` (Dense if `use_linear_projection`, else 1x1 Conv) ->
    transformer blocks -> `proj_out` -> + input.
    """

    heads: int
    dim_head: int
    num_layers: int
    norm_num_groups: int
    use_linear_projection: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dt, pdt = self.dtype, self.param_dtype
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = group_norm(self.norm_num_groups, 1e-6, dt, pdt, "norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=dt, param_dtype=pdt, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = conv2d(inner, 1, dt, pdt, "proj_in")(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                dtype=dt,
                param_dtype=pdt,
                name=f"transformer_blocks.{i}",
            )(x, context)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=dt, param_dtype=pdt, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = conv2d(c, 1, dt, pdt, "proj_out")(x.reshape(b, h, w, inner))
        return x + residual
