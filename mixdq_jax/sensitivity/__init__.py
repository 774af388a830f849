"""Per-layer importance: MixDQ's metric-decoupled sensitivity sweep and MPQ-Diff orthogonality."""

from mixdq_jax.sensitivity.orthogonality import (
    Orthogonality,
    OrthogonalityConfig,
    linear_cka,
    orthogonality,
)
from mixdq_jax.sensitivity.sweep import (
    KINDS,
    METRICS,
    SQNR_CAP_DB,
    Evaluator,
    Scores,
    SweepConfig,
    base_qconfig,
    default_mesh,
    load_calibration,
    single_layer_qconfigs,
    sweep,
)

__all__ = [
    "KINDS",
    "METRICS",
    "Orthogonality",
    "OrthogonalityConfig",
    "SQNR_CAP_DB",
    "Evaluator",
    "Scores",
    "SweepConfig",
    "base_qconfig",
    "default_mesh",
    "linear_cka",
    "load_calibration",
    "orthogonality",
    "single_layer_qconfigs",
    "sweep",
]
