"""CLIP text encoders (SD1.5 ``text_encoder``, SDXL ``text_encoder`` / ``text_encoder_2``) in linen.

transformers 5 ships no Flax CLIP, so this mirrors its PyTorch ``CLIPTextModel`` and
``CLIPTextModelWithProjection``. Module names are the transformers 5 state-dict names without the
``text_model.`` prefix (``encoder.layers.3.self_attn.q_proj``), so
``weights_convert.torch_to_flax(normalize_clip_keys(state), ...)`` loads old and new checkpoints.
Inference only: dropout is never applied. The text encoders stay in float under quantization.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

_ACTIVATIONS = ("quick_gelu", "gelu")
_MODEL_TYPES = ("clip_text_model", "clip")
# eos_token_id 2 marks configs written before transformers PR #24773: the pooled token is then
# the position of the highest token id (the eos of the original vocab), not the first eos.
_LEGACY_EOS_TOKEN_ID = 2


@dataclass(frozen=True, kw_only=True)
class CLIPTextConfig:
    """The architecture fields of a transformers ``CLIPTextConfig`` (defaults are its defaults)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "projection_dim",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"CLIPTextConfig.{key} must be a positive int, got {value!r}")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            optional = key != "eos_token_id"
            if not (optional and value is None) and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise ValueError(f"CLIPTextConfig.{key} must be an int, got {value!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIPTextConfig.hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}"
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ValueError(f"CLIPTextConfig.layer_norm_eps must be a positive float, got {eps!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPTextConfig:
        """From a transformers ``config.json`` dict; generic keys (architectures, dtype, ...) are
        ignored. A full ``CLIPConfig`` is read through its ``text_config``."""
        if "text_config" in data:
            data = data["text_config"]
        model_type = data.get("model_type", "clip_text_model")
        if model_type not in _MODEL_TYPES:
            raise ValueError(
                f"CLIPTextConfig: model_type must be one of {_MODEL_TYPES}, got {model_type!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, path: str | Path) -> CLIPTextConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(data)


@flax.struct.dataclass
class CLIPTextOutput:
    """What the SD pipelines read: ``hidden_states[-2]`` is SDXL's penultimate-layer state.

    ``hidden_states`` = (embeddings, layer 1, ..., layer N), before the final layer norm;
    ``last_hidden_state`` is layer N after it. ``text_embeds`` only for the projection model.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    text_embeds: jax.Array | None = None


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads

        def proj(name):
            y = _dense(self, cfg.hidden_size, name)(x)
            return y.reshape(*y.shape[:-1], heads, dim)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * dim**-0.5
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape[:-1] + (cfg.hidden_size,))
        return _dense(self, cfg.hidden_size, "out_proj")(out)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        h = _layer_norm(self, "layer_norm1")(x)
        x = x + CLIPAttention(cfg, self.dtype, self.param_dtype, name="self_attn")(h, mask)
        h = _layer_norm(self, "layer_norm2")(x)
        h = _dense(self, cfg.intermediate_size, "mlp.fc1")(h)
        h = _dense(self, cfg.hidden_size, "mlp.fc2")(_activation(cfg.hidden_act, h))
        return x + h


def _dense(owner: nn.Module, features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=owner.dtype,
        param_dtype=owner.param_dtype,
        name=name,
    )


def _layer_norm(owner: nn.Module, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it (the fast E[x^2]-E[x]^2 form loses digits).
    return nn.LayerNorm(
        epsilon=owner.config.layer_norm_eps,
        use_fast_variance=False,
        dtype=owner.dtype,
        param_dtype=owner.param_dtype,
        name=name,
    )


class CLIPTextModel(nn.Module):
    """transformers ``CLIPTextModel``: ``(input_ids [B, T], attention_mask=None)`` -> output.

    The causal mask is always applied; ``attention_mask`` (1 = keep) additionally hides padded keys.
    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype; softmax runs in float32.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _encode(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> CLIPTextOutput:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        seq = input_ids.shape[1]
        if seq > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} > max_position_embeddings {cfg.max_position_embeddings}"
            )
        tokens = self._embed(cfg.vocab_size, "embeddings.token_embedding")(input_ids)
        positions = self._embed(cfg.max_position_embeddings, "embeddings.position_embedding")(
            jnp.arange(seq)
        )
        x = tokens + positions[None]

        mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        hidden_states = [x]
        for i in range(cfg.num_hidden_layers):
            layer = CLIPEncoderLayer(cfg, self.dtype, self.param_dtype, name=f"encoder.layers.{i}")
            x = layer(x, mask)
            hidden_states.append(x)
        last = _layer_norm(self, "final_layer_norm")(x)

        ids = input_ids.astype(jnp.int32)
        if cfg.eos_token_id == _LEGACY_EOS_TOKEN_ID:
            eos_pos = jnp.argmax(ids, axis=-1)
        else:  # first eos: the pad token may equal eos
            eos_pos = jnp.argmax((ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(last.shape[0]), eos_pos]
        return CLIPTextOutput(
            last_hidden_state=last, pooler_output=pooled, hidden_states=tuple(hidden_states)
        )

    def _embed(self, num: int, name: str) -> nn.Embed:
        hidden = self.config.hidden_size
        return nn.Embed(num, hidden, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        return self._encode(input_ids, attention_mask)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers ``CLIPTextModelWithProjection`` (SDXL ``text_encoder_2``): adds ``text_embeds``,
    the pooled state through ``text_projection`` (no bias)."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        out = self._encode(input_ids, attention_mask)
        embeds = _dense(self, self.config.projection_dim, "text_projection", use_bias=False)(
            out.pooler_output
        )
        return out.replace(text_embeds=embeds)
