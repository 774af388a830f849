"""Per-layer importance: MixDQ's metric-decoupled sensitivity sweep and MPQ-Diff orthogonality.

`config` (what to sweep), `calibration` (the run's float references), `configs` (the stacked
single-layer configurations), `evaluator` (the vmapped, sharded metric programs), `sweep`
(chunking, resuming, results), `orthogonality`.
"""

from mixdq_jax.sensitivity.calibration import CalibData, load_calibration
from mixdq_jax.sensitivity.config import KINDS, METRICS, SQNR_CAP_DB, Scores, SweepConfig
from mixdq_jax.sensitivity.configs import base_qconfig, single_layer_qconfigs, split_swept
from mixdq_jax.sensitivity.evaluator import Evaluator, default_mesh
from mixdq_jax.sensitivity.orthogonality import (
    Orthogonality,
    OrthogonalityConfig,
    linear_cka,
    orthogonality,
)
from mixdq_jax.sensitivity.sweep import sweep, write_scores

__all__ = [
    "KINDS",
    "METRICS",
    "SQNR_CAP_DB",
    "CalibData",
    "Evaluator",
    "Orthogonality",
    "OrthogonalityConfig",
    "Scores",
    "SweepConfig",
    "base_qconfig",
    "default_mesh",
    "linear_cka",
    "load_calibration",
    "orthogonality",
    "single_layer_qconfigs",
    "split_swept",
    "sweep",
    "write_scores",
]
