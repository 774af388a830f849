"""A quantized UNet as one value: what sampling, refiners, export and loading pass around.

A quantized UNet is its params (float kernels under fake quantization, whose nearest rounding
may be learned codes; packed integer weights when deployed), the configuration that
fake-quantizes them (`QConfig`: bits and ranges as arrays), or the layer mode that runs them
(`Deployed` for a packed UNet), the activation ranges the configuration was built from
(export packs them) and, for PTQD on several sampling steps, the correction of the output
noise that the sampling loop applies. The pipeline holds none of this: it is called with the
value (``pipe(prompt, quantized=q)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from mixdq_jax.quant.intercept import Mode
from mixdq_jax.quant.modes import default_mode
from mixdq_jax.quant.qconfig import QConfig
from mixdq_jax.schedulers.noise_correction import NoiseModel


@dataclass(frozen=True, kw_only=True)
class QuantizedUNet:
    """``params`` (the UNet's params tree); ``qconfig`` (fake quantization; ``None`` for a
    packed UNet or the float model); ``mode`` (the layer mode when the params fix it, e.g.
    `Deployed`; ``None``: fake quantization by ``qconfig``); ``correction`` (PTQD's noise
    model for the sampling loop, or ``None``); ``act_ranges`` (layer -> ``[parts, 2]``, as
    calibration records them; what an export packs)."""

    params: Any
    qconfig: QConfig | None = None
    mode: Mode | None = None
    correction: NoiseModel | None = None
    act_ranges: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode is not None and self.qconfig is not None:
            raise ValueError(
                "QuantizedUNet: a fixed layer mode (a packed UNet) takes no qconfig; quantize "
                "the float params to try other configurations"
            )

    @property
    def layer_mode(self) -> Mode:
        """What runs at each layer: ``mode``, or fake quantization by ``qconfig``."""
        return default_mode(self.qconfig) if self.mode is None else self.mode

    def replace(self, **changes: Any) -> QuantizedUNet:
        return replace(self, **changes)
