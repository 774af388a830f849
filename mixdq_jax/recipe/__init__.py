"""The whole MixDQ recipe on any model (`mixdq quantize`): calibrate, metric-decoupled
sensitivity, Algorithm 1 for weights and activations, selection by image error, export."""

from mixdq_jax.recipe.allocate import AllocationKnobs, Layers, bits_summary, protected_acts
from mixdq_jax.recipe.config import (
    METHODS,
    PRESETS,
    RECONSTRUCTION_METHODS,
    STAGES,
    Method,
    Preset,
    Target,
)
from mixdq_jax.recipe.run import Allocation, Recipe, RecipeConfig, quantize, recipe_key

__all__ = [
    "METHODS",
    "PRESETS",
    "RECONSTRUCTION_METHODS",
    "STAGES",
    "Allocation",
    "AllocationKnobs",
    "Layers",
    "Method",
    "Preset",
    "Recipe",
    "RecipeConfig",
    "Target",
    "bits_summary",
    "protected_acts",
    "quantize",
    "recipe_key",
]
