"""Flax (linen) models named like their diffusers/transformers PyTorch counterparts."""

from mixdq_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig
from mixdq_jax.models.vae import AutoencoderKL, VAEConfig, legacy_vae_keys

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "legacy_vae_keys",
]
