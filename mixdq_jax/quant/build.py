"""Build a model's config arrays from a :class:`QuantSpec` and a calibration."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from mixdq_jax.quant.qconfig import QConfig, QuantSpec
from mixdq_jax.quant.registry import layer_splits, unet_layers
from mixdq_jax.rundir import RunDir

Calibration = str | os.PathLike | RunDir | Mapping[str, Any]


def act_ranges(calib: Calibration | None) -> Mapping[str, Any] | None:
    """Activation ranges from a calibration run directory, or a ``{layer: range}`` mapping."""
    if calib is None or isinstance(calib, Mapping):
        return calib
    run = calib if isinstance(calib, RunDir) else RunDir(calib)
    return run.act_ranges()


def qconfig_for(pipe: Any, spec: QuantSpec, calib: Calibration | None = None) -> QConfig:
    """The config arrays of ``spec`` for the UNet layers of ``pipe`` (a ``Pipeline``, or
    anything with ``.unet.config``).

    ``calib``: a calibration run directory (`mixdq calibrate`) or a ``{layer: range}``
    mapping; needed whenever activations are quantized.
    """
    return spec.to_qconfig(layer_splits(unet_layers(pipe.unet.config)), act_ranges(calib))
