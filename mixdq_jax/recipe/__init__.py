"""The whole MixDQ recipe on any model (`mixdq quantize`): calibrate, metric-decoupled
sensitivity, the method's allocation, selection by image error, refiners, export. Methods
(what a row allocates and refines) are plug-ins of `mixdq_jax.methods`; the stages are one
table (`STAGES`) that `quantize` and the study walk."""

from mixdq_jax.recipe.config import PRESETS, Preset
from mixdq_jax.recipe.run import ChosenBits, Recipe, RecipeConfig, recipe_key
from mixdq_jax.recipe.stages import STAGE_NAMES, STAGES, Row, Stage, quantize, walk

__all__ = [
    "PRESETS",
    "STAGES",
    "STAGE_NAMES",
    "ChosenBits",
    "Preset",
    "Recipe",
    "RecipeConfig",
    "Row",
    "Stage",
    "quantize",
    "recipe_key",
    "walk",
]
