"""What a sensitivity sweep measures: kinds, metrics, bits, layers, chunking."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mixdq_jax.official_format import SENSITIVITY_BITS
from mixdq_jax.quant.qconfig import QUANT_BITS, QuantSpec

KINDS: tuple[str, ...] = ("weight", "act")
METRICS: tuple[str, ...] = ("sqnr", "ssim")
SQNR_CAP_DB = 200.0  # float32 outputs cannot resolve more; an exactly zero error maps here
SQNR_AGGREGATES: tuple[str, ...] = ("mean_db", "ratio_of_sums")

Scores = dict[str, tuple[float, ...]]  # {layer: (score at bits[0], bits[1], ...)}


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """What to sweep.

    ``metrics``: ``"mixdq"`` (SQNR for every layer, SSIM for content layers), ``"sqnr"``,
    ``"ssim"`` (that metric for every layer), or a tuple of ``"sqnr"``/``"ssim"`` (each for
    every layer). ``spec`` carries the quantizer flags (BOS-aware, shortcut split, symmetric
    or FP8 formats); its bit-widths are ignored (the base configuration is all float).
    ``layers`` restricts the sweep to some layers (``None``: all); the configuration then holds
    only those (the others run untouched, exactly as at float bits), which compiles and runs
    faster than the whole model's configuration.
    ``chunk`` configurations are evaluated per call (rounded up to a multiple of the devices);
    each device holds ``chunk / devices`` copies of the activations of one calibration batch
    (for SSIM: through the VAE decoder too), so on SDXL start with one or two per device.
    ``sqnr``: how SQNR aggregates over the calibration rows (`Evaluator.sqnr_db`):
    ``"mean_db"`` (mean of per-prompt dB, the paper's wording) or ``"ratio_of_sums"`` (the
    released code).
    """

    kinds: tuple[str, ...] = KINDS
    bits: tuple[int, ...] = SENSITIVITY_BITS
    metrics: str | tuple[str, ...] = "mixdq"
    chunk: int = 8
    spec: QuantSpec = field(default_factory=QuantSpec)
    layers: tuple[str, ...] | None = None
    sqnr: str = "mean_db"

    def __post_init__(self) -> None:
        if self.sqnr not in SQNR_AGGREGATES:
            raise ValueError(f"SweepConfig: sqnr must be one of {SQNR_AGGREGATES}: {self.sqnr!r}")
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"SweepConfig: kinds must be among {KINDS}, got {kinds!r}")
        bits = tuple(int(b) for b in self.bits)
        object.__setattr__(self, "bits", bits)
        if not bits or any(b not in QUANT_BITS for b in bits) or len(set(bits)) != len(bits):
            raise ValueError(
                f"SweepConfig: bits must be distinct values in {list(QUANT_BITS)}, got {bits}"
            )
        if isinstance(self.metrics, str):
            if self.metrics not in ("mixdq", *METRICS):
                raise ValueError(
                    f"SweepConfig: metrics must be 'mixdq', 'sqnr', 'ssim' or a tuple of "
                    f"'sqnr'/'ssim', got {self.metrics!r}"
                )
        else:
            metrics = tuple(self.metrics)
            if not metrics or any(m not in METRICS for m in metrics):
                raise ValueError(f"SweepConfig: metrics tuple must hold 'sqnr'/'ssim': {metrics}")
            object.__setattr__(self, "metrics", metrics)
        if self.chunk < 1:
            raise ValueError(f"SweepConfig: chunk must be >= 1, got {self.chunk}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def metric_layers(self, layers: Sequence[Any]) -> dict[str, list[str]]:
        """``{metric: [layer names]}`` for registry ``LayerInfo``s, in registry order."""
        names = [layer.name for layer in layers]
        if self.metrics == "mixdq":
            return {
                "sqnr": names,
                "ssim": [layer.name for layer in layers if layer.group == "content"],
            }
        metrics = (self.metrics,) if isinstance(self.metrics, str) else self.metrics
        return {m: list(names) for m in metrics}
