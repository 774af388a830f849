"""Reconstruction-based quantization: AdaRound rounding and LSQ step sizes learned block by
block (BRECQ, Q-Diffusion), EDA-DM's calibration selection and layer losses, and PTQD's noise
correction. Everything ends as data the rest of the library already runs: a float params tree
whose nearest rounding is the learned codes, and ordinary activation ranges (see `loop`); PTQD
on several sampling steps adds a noise model the sampling loop applies
(`mixdq_jax.schedulers.noise_correction`)."""

from mixdq_jax.reconstruction.adaround import (
    beta_schedule,
    fold_codes,
    init_rounding,
    learned_codes,
    nearest_codes,
    rectified_sigmoid,
    rounded_kernel,
    rounding_regularizer,
)
from mixdq_jax.reconstruction.blocks import BLOCK_PATTERN, Unit, capture, find_units, unet_apply
from mixdq_jax.reconstruction.calib_select import CalibSelect
from mixdq_jax.reconstruction.loop import ReconConfig, Reconstruction, reconstruct
from mixdq_jax.reconstruction.lsq import init_step, lsq_fake_quant, step_range
from mixdq_jax.reconstruction.mode import LearnedRounding, Rounding

__all__ = [
    "BLOCK_PATTERN",
    "CalibSelect",
    "LearnedRounding",
    "ReconConfig",
    "Reconstruction",
    "Rounding",
    "Unit",
    "beta_schedule",
    "capture",
    "find_units",
    "fold_codes",
    "init_rounding",
    "init_step",
    "learned_codes",
    "lsq_fake_quant",
    "nearest_codes",
    "reconstruct",
    "rectified_sigmoid",
    "rounded_kernel",
    "rounding_regularizer",
    "step_range",
    "unet_apply",
]
