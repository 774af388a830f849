"""ImageReward's network (Xu et al. 2023) in linen: BLIP's ViT, BLIP's BERT with cross-attention
to the image, and the MLP head on the text [CLS] state.

Module names are the keys of the released ``ImageReward.pt`` (``blip.visual_encoder.blocks.3.
attn.qkv``, ``blip.text_encoder.encoder.layer.0.crossattention.self.key``, ``mlp.layers.0``), so
``weights_convert.torch_to_flax`` loads it directly. Inference only (dropout never applies).
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

VIT_HEAD_DIM = 64  # every BLIP ViT (base: 768/12, large: 1024/16)


@dataclass(frozen=True, kw_only=True)
class BLIPVisionConfig:
    """BLIP's ViT; the defaults are ImageReward's ('large', 224 px)."""

    width: int = 1024
    depth: int = 24
    heads: int = 16
    patch_size: int = 16
    image_size: int = 224
    mlp_dim: int = 4096
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        for key in ("width", "depth", "heads", "patch_size", "image_size", "mlp_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BLIPVisionConfig.{key} must be a positive int, got {value!r}")
        if self.width % self.heads or self.image_size % self.patch_size:
            raise ValueError(f"BLIPVisionConfig: width {self.width} must divide into {self.heads}"
                             f" heads and image_size {self.image_size} into {self.patch_size}-px "
                             "patches")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class BLIPTextConfig:
    """BLIP's BERT (``med_config.json``); ``encoder_width`` is the ViT's width."""

    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    encoder_width: int = 1024

    def __post_init__(self):
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "encoder_width"):  # fmt: skip
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BLIPTextConfig.{key} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BLIPTextConfig: hidden_size {self.hidden_size} is not divisible "
                             f"by num_attention_heads {self.num_attention_heads}")  # fmt: skip


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)  # two-pass, as torch


def _attention(q, k, v, heads: int, mask=None):
    """Multi-head attention on ``[B, T, D]`` projections; ``mask [B, S]`` (1 = keep) on keys."""
    b, t, d = q.shape
    hd = d // heads
    q, k, v = (x.reshape(x.shape[0], x.shape[1], heads, hd) for x in (q, k, v))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * hd**-0.5
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :].astype(bool), scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)


class ViTBlock(nn.Module):
    config: BLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        h = _layer_norm(cfg.layer_norm_eps, "norm1")(x)
        q, k, v = jnp.split(nn.Dense(3 * cfg.width, name="attn.qkv")(h), 3, axis=-1)
        x = x + nn.Dense(cfg.width, name="attn.proj")(_attention(q, k, v, cfg.heads))
        h = _layer_norm(cfg.layer_norm_eps, "norm2")(x)
        h = nn.Dense(cfg.width, name="mlp.fc2")(
            jax.nn.gelu(nn.Dense(cfg.mlp_dim, name="mlp.fc1")(h), approximate=False)
        )
        return x + h


class BLIPVisionTransformer(nn.Module):
    """Pixels ``[B, H, W, 3]`` (normalized) -> every token's state ``[B, 1 + patches, width]``."""

    config: BLIPVisionConfig

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        p, n = cfg.patch_size, (cfg.image_size // cfg.patch_size) ** 2
        x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding="VALID", name="patch_embed.proj")(
            pixels
        )
        x = x.reshape(x.shape[0], -1, cfg.width)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, cfg.width))
        pos = self.param("pos_embed", nn.initializers.zeros, (1, n + 1, cfg.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, cfg.width)), x], axis=1) + pos
        for i in range(cfg.depth):
            x = ViTBlock(cfg, name=f"blocks.{i}")(x)
        return _layer_norm(cfg.layer_norm_eps, "norm")(x)


class BertAttention(nn.Module):
    """``attention`` or ``crossattention`` of a BLIP BERT layer (post-norm residual)."""

    config: BLIPTextConfig

    @nn.compact
    def __call__(self, x, context, mask):
        cfg = self.config
        q = nn.Dense(cfg.hidden_size, name="self.query")(x)
        k = nn.Dense(cfg.hidden_size, name="self.key")(context)
        v = nn.Dense(cfg.hidden_size, name="self.value")(context)
        out = nn.Dense(cfg.hidden_size, name="output.dense")(
            _attention(q, k, v, cfg.num_attention_heads, mask)
        )
        return _layer_norm(cfg.layer_norm_eps, "output.LayerNorm")(out + x)


class BertLayer(nn.Module):
    config: BLIPTextConfig

    @nn.compact
    def __call__(self, x, mask, image):
        cfg = self.config
        x = BertAttention(cfg, name="attention")(x, x, mask)
        x = BertAttention(cfg, name="crossattention")(x, image, None)  # every image token
        h = jax.nn.gelu(nn.Dense(cfg.intermediate_size, name="intermediate.dense")(x),
                        approximate=False)  # fmt: skip
        h = nn.Dense(cfg.hidden_size, name="output.dense")(h)
        return _layer_norm(cfg.layer_norm_eps, "output.LayerNorm")(h + x)


class BLIPTextEncoder(nn.Module):
    """``(ids [B, T], mask [B, T], image states)`` -> text states ``[B, T, hidden]``
    (bidirectional self-attention: BLIP's text encoder, not its decoder)."""

    config: BLIPTextConfig

    @nn.compact
    def __call__(self, ids, mask, image):
        cfg = self.config
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, name="embeddings.word_embeddings")(ids)
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                       name="embeddings.position_embeddings")(jnp.arange(ids.shape[1]))  # fmt: skip
        x = _layer_norm(cfg.layer_norm_eps, "embeddings.LayerNorm")(x + pos[None])
        for i in range(cfg.num_hidden_layers):
            x = BertLayer(cfg, name=f"encoder.layer.{i}")(x, mask, image)
        return x


class ImageRewardNet(nn.Module):
    """``(pixels, ids, mask)`` -> the raw reward ``[B]`` (before the released mean/std)."""

    vision: BLIPVisionConfig
    text: BLIPTextConfig
    head: tuple[tuple[int, int], ...]  # (index in ``mlp.layers``, out features) per Linear

    @nn.compact
    def __call__(self, pixels, ids, mask):
        image = BLIPVisionTransformer(self.vision, name="blip.visual_encoder")(pixels)
        states = BLIPTextEncoder(self.text, name="blip.text_encoder")(ids, mask, image)
        x = states[:, 0]
        for index, features in self.head:  # Linear layers only: ImageReward has no activations
            x = nn.Dense(features, name=f"mlp.layers.{index}")(x)
        return x[:, 0]
