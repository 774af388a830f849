"""A quantized UNet as one value: what refiners take and return, and what export writes.

Fake quantization needs the UNet params (float kernels; after learned rounding their nearest
rounding is the learned codes), the configuration (`QConfig`: bits and ranges as arrays),
the activation ranges it was built from (export packs them) and, for PTQD on several
sampling steps, the correction of the output noise the sampling loop applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mixdq_jax.quant.qconfig import QConfig
from mixdq_jax.schedulers.noise_correction import NoiseModel


@dataclass(frozen=True, kw_only=True)
class QuantizedUNet:
    """``params`` (the UNet's params tree), ``qconfig``, ``act_ranges`` (layer ->
    ``[parts, 2]``, as calibration records them) and ``correction`` (PTQD's noise model for
    the sampling loop, or ``None``)."""

    params: Any
    qconfig: QConfig
    act_ranges: Mapping[str, np.ndarray]
    correction: NoiseModel | None = None

    def replace(self, **changes: Any) -> QuantizedUNet:
        return replace(self, **changes)
