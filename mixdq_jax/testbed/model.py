"""The testbed text-to-image model: SDXL's structure in miniature.

Two causal CLIP text encoders (the second with a pooled projection), a UNet2DConditionModel with
SDXL's block pattern (a plain down block, then cross-attention blocks with more transformer
layers deeper, ``text_time`` add-embeddings, linear projections) and an AutoencoderKL with
4-channel latents. Configs are diffusers/transformers ``config.json`` dicts, so the saved folder
loads in diffusers as it loads here.
"""

from __future__ import annotations

from typing import Any

from mixdq_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig
from mixdq_jax.models.vae import AutoencoderKL, VAEConfig

IMAGE_SIZE = 64
LATENT_SIZE = 16  # the VAE downsamples by 4
TEXT_DIMS = (32, 64)  # hidden sizes of text_encoder and text_encoder_2
POOLED_DIM = 32  # text_encoder_2's projection
TIME_EMBED_DIM = 8
TIME_IDS = (IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE)  # as the SDXL pipeline builds

UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "block_out_channels": [32, 48, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": [1, 1, 2],
    "attention_head_dim": [2, 2, 4],
    "cross_attention_dim": sum(TEXT_DIMS),
    "norm_num_groups": 16,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": POOLED_DIM + len(TIME_IDS) * TIME_EMBED_DIM,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "act_fn": "silu",
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # replaced by 1 / std of the trained latents
    "force_upcast": False,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "trained_betas": None,
}


def text_config(index: int, vocab_size: int, *, bos: int, eos: int, pad: int) -> dict[str, Any]:
    """transformers config.json of text encoder ``index`` (0: CLIPTextModel, 1: WithProjection)."""
    cfg: dict[str, Any] = {
        "architectures": ["CLIPTextModel", "CLIPTextModelWithProjection"][index:index + 1],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": TEXT_DIMS[index],
        "intermediate_size": 4 * TEXT_DIMS[index],
        "num_hidden_layers": 3,
        "num_attention_heads": 2 if index == 0 else 4,
        "max_position_embeddings": 77,
        "hidden_act": ["quick_gelu", "gelu"][index],
        "layer_norm_eps": 1e-5,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "projection_dim": POOLED_DIM,
    }
    return cfg


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(config=UNetConfig.from_dict(UNET_CONFIG))


def build_vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    return AutoencoderKL(config=VAEConfig.from_dict({**VAE_CONFIG,
                                                     "scaling_factor": scaling_factor}))


def build_text_encoders(configs: tuple[dict, dict]) -> tuple[CLIPTextModel, CLIPTextModel]:
    return (
        CLIPTextModel(config=CLIPTextConfig.from_dict(configs[0])),
        CLIPTextModelWithProjection(config=CLIPTextConfig.from_dict(configs[1])),
    )
