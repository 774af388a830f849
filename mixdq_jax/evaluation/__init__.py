"""The paper's evaluation: FID, CLIP score, ImageReward, LPIPS and image metrics vs float.

Every network here runs from weights the user already has (nothing is downloaded); a missing
file raises `MissingWeightsError`, which says which file is needed and where it comes from.
"""

from mixdq_jax.evaluation.errors import MissingWeightsError

__all__ = ["MissingWeightsError"]
