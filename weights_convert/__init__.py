"""diffusers/transformers checkpoints <-> Flax parameter trees (numpy only, no torch)."""

from weights_convert.clip_keys import normalize_clip_keys
from weights_convert.convert import ConversionError, flax_to_torch, torch_to_flax

__all__ = ["ConversionError", "flax_to_torch", "normalize_clip_keys", "torch_to_flax"]
