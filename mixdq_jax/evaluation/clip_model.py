"""The CLIP dual encoder (transformers ``CLIPModel``) in linen, for the CLIP score.

The text tower is our generation-side ``CLIPTextModel`` (``mixdq_jax.models.clip``); this adds
the vision tower (a ViT: patch conv, class token, ``pre_layrnorm``, the same pre-norm
transformer layers as the text tower, ``post_layernorm`` on the class token) and the two
bias-free projections into the shared embedding space. Module names are the transformers
state-dict names (``vision_model.encoder.layers.3.mlp.fc1``, ``visual_projection``), so
``weights_convert.torch_to_flax`` loads a ``CLIPModel.save_pretrained`` folder directly.
Inference only; float32 by default (an evaluation network, compared against torch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixdq_jax.models.clip import CLIPEncoderLayer, CLIPTextConfig, CLIPTextModel

_ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True, kw_only=True)
class CLIPVisionConfig:
    """The architecture fields of a transformers ``CLIPVisionConfig`` (defaults are its own)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("hidden_act", "layer_norm_eps"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPVisionConfig.{f.name} must be a positive int, got {value!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPVisionConfig.hidden_act must be one of {_ACTIVATIONS}, "
                f"got {self.hidden_act!r}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"CLIPVisionConfig: image_size {self.image_size} is not a multiple of "
                f"patch_size {self.patch_size}"
            )
        # The shared transformer layer validates the rest (head divisibility, eps).
        self.layer_config()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPVisionConfig:
        """From a ``vision_config`` dict; generic keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def layer_config(self) -> CLIPTextConfig:
        """The fields a transformer layer reads, as the config type the shared layer takes.

        Vision and text layers are the same module (pre-norm attention + MLP); only these five
        fields enter it, so the vision tower reuses the text tower's layer unchanged."""
        return CLIPTextConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
        )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """A transformers ``CLIPConfig``: both towers and the shared embedding width."""

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        """From a ``CLIPModel`` ``config.json``; the top-level ``projection_dim`` is the one
        ``CLIPModel`` uses (the towers' own copies are ignored, as transformers does)."""
        if data.get("model_type", "clip") != "clip":
            raise ValueError(f"CLIPConfig: model_type must be 'clip', got {data['model_type']!r}")
        for key in ("text_config", "vision_config"):
            if not isinstance(data.get(key), dict):
                raise ValueError(f"CLIPConfig: no {key!r} section (not a CLIPModel config)")
        text = CLIPTextConfig.from_dict(data["text_config"])
        vision = CLIPVisionConfig.from_dict(data["vision_config"])
        dim = data.get("projection_dim", 512)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"CLIPConfig.projection_dim must be a positive int, got {dim!r}")
        return cls(text=text, vision=vision, projection_dim=dim)


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it.
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class CLIPVisionEmbeddings(nn.Module):
    """Patch embedding (a bias-free conv, stride = kernel = patch) + class token + positions."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
            name="patch_embedding",
        )(pixels)  # fmt: skip
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major (h, w), as torch flattens
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.hidden_size)), patches], axis=1)
        positions = nn.Embed(cfg.num_patches + 1, cfg.hidden_size, name="position_embedding")
        return x + positions(jnp.arange(cfg.num_patches + 1))[None]


class CLIPVisionModel(nn.Module):
    """transformers ``CLIPVisionModel``: pixels ``[B, H, W, C]`` (NHWC, already normalized) ->
    the pooled class token ``[B, hidden]`` after ``post_layernorm``."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        size = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != size:
            raise ValueError(f"pixels must be [batch, {size[0]}, {size[1]}, {size[2]}], "
                             f"got shape {pixels.shape}")  # fmt: skip
        x = CLIPVisionEmbeddings(cfg, name="embeddings")(pixels)
        x = _layer_norm(cfg.layer_norm_eps, "pre_layrnorm")(x)  # sic: the transformers name
        layer_cfg = cfg.layer_config()
        no_mask = jnp.ones((1, 1, 1, 1), dtype=bool)  # every patch sees every patch
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(layer_cfg, name=f"encoder.layers.{i}")(x, no_mask)
        return _layer_norm(cfg.layer_norm_eps, "post_layernorm")(x[:, 0])


class CLIPModel(nn.Module):
    """transformers ``CLIPModel`` without the contrastive head: ``image_features`` and
    ``text_features`` are ``get_image_features`` / ``get_text_features`` (projected, not
    normalized). ``logit_scale`` is not needed for a score and is not a parameter here."""

    config: CLIPConfig

    def setup(self):
        cfg = self.config
        self.vision_model = CLIPVisionModel(cfg.vision)
        self.text_model = CLIPTextModel(cfg.text)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False)

    def image_features(self, pixels: jax.Array) -> jax.Array:
        return self.visual_projection(self.vision_model(pixels))

    def text_features(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        return self.text_projection(self.text_model(input_ids, attention_mask).pooler_output)

    def __call__(self, pixels: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Both feature sets (used by ``init``, which must touch every parameter)."""
        return self.image_features(pixels), self.text_features(input_ids)
