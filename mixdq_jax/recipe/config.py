"""What `mixdq quantize` runs, as data: targets, methods (the paper's rows) and presets."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from mixdq_jax.quant.qconfig import FLOAT_BITS

_TARGET = re.compile(r"^W(\d+(?:\.\d+)?)A(\d+)$", re.IGNORECASE)
STAGES: tuple[str, ...] = (
    "calibrate", "sensitivity", "weights", "acts", "reconstruct", "export", "report",
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Target:
    """A budget as the paper writes it: ``W4A8`` is 4 average weight bits and 8-bit
    activations (MixDQ: mixed {4, 8} at ``act_average`` plus the protected layers in float);
    ``A16`` keeps activations float."""

    weight_bits: float
    act_bits: int

    def __post_init__(self) -> None:
        if not 2.0 <= self.weight_bits <= 8.0 or not math.isfinite(self.weight_bits):
            raise ValueError(f"target weight bits {self.weight_bits} outside [2, 8]")
        if self.act_bits not in (8, FLOAT_BITS):
            raise ValueError(
                f"target activation bits {self.act_bits}: only A8 (mixed 4/8) and A16 (float)"
            )

    @classmethod
    def parse(cls, text: str) -> Target:
        """``"W4A8"``, ``"W3.66A16"``, ... (case-insensitive)."""
        match = _TARGET.match(text.strip())
        if match is None:
            raise ValueError(f"target {text!r}: expected W<bits>A<bits>, e.g. W8A8, W4A8, W3.66A16")
        return cls(weight_bits=float(match.group(1)), act_bits=int(match.group(2)))

    @property
    def name(self) -> str:
        w = self.weight_bits
        return f"W{int(w) if float(w).is_integer() else f'{w:g}'}A{self.act_bits}"

    @property
    def quantizes_acts(self) -> bool:
        return self.act_bits < FLOAT_BITS


@dataclass(frozen=True, kw_only=True)
class Method:
    """How a row allocates bits.

    ``weights`` / ``acts``: ``"uniform"`` (every layer at the target; no row for a fractional
    weight target), ``"sqnr"`` (one integer program over all layers scored by SQNR: the
    paper's mixed precision without metric decoupling, Table 3 "+MP"), ``"mixdq"``
    (metric-decoupled groups, Algorithm 1's (B, k) candidates, picked by image error vs
    float). Mixed-precision activations keep the most sensitive ``protect_top`` percent of
    layers (per group for ``"mixdq"``) in float. ``bos_aware``: BOS-aware text-embedding
    quantization (sec. 3.1). ``fp8``: FP8 e4m3 instead of the integer grid (W8A8 only).
    ``rounding``: ``"nearest"``, or ``"adaround"``: the chosen bits reconstructed block by
    block (BRECQ + AdaRound + LSQ steps, `mixdq_jax.reconstruction`; the recipe's
    ``reconstruct`` stage). ``ptqd``: PTQD's correction of the output noise (its correlated
    part and mean; with several sampling steps also its variance, in the sampling loop).
    ``calib_select``: EDA-DM's temporal distribution alignment calibration (the reconstruction
    samples chosen per sampling step, `mixdq_jax.reconstruction.calib_select`; a no-op at one
    step). ``layer_loss_weight``: EDA-DM's fine-grained block reconstruction (the layers'
    output errors added to the block's at this weight; ``ReconConfig.layer_loss_weight``).
    """

    name: str
    title: str
    weights: str
    acts: str
    bos_aware: bool
    fp8: bool = False
    rounding: str = "nearest"
    ptqd: bool = False
    calib_select: bool = False
    layer_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        for what, value in (("weight", self.weights), ("activation", self.acts)):
            if value not in ("uniform", "sqnr", "mixdq"):
                raise ValueError(f"method {self.name!r}: unknown {what} allocation {value!r}")
        if self.fp8 and (self.weights, self.acts) != ("uniform", "uniform"):
            raise ValueError(f"method {self.name!r}: FP8 is a uniform format")
        if self.rounding not in ("nearest", "adaround"):
            raise ValueError(f"method {self.name!r}: unknown rounding {self.rounding!r}")
        if self.fp8 and (self.rounding != "nearest" or self.ptqd):
            raise ValueError(f"method {self.name!r}: FP8 has no learned rounding or PTQD")
        if self.layer_loss_weight < 0.0:
            raise ValueError(f"method {self.name!r}: negative layer_loss_weight")
        if (self.calib_select or self.layer_loss_weight) and self.rounding != "adaround":
            raise ValueError(
                f"method {self.name!r}: calibration selection and layer losses are parts of "
                "the reconstruction (rounding='adaround')"
            )

    def settings(self) -> dict[str, Any]:
        """The fields a resumed recipe must match: ``rounding``, ``ptqd``, ``calib_select``
        and ``layer_loss_weight`` only when set, so runs started before those fields existed
        still resume."""
        out = asdict(self)
        if self.rounding == "nearest":
            del out["rounding"]
        if not self.ptqd:
            del out["ptqd"]
        if not self.calib_select:
            del out["calib_select"]
        if self.layer_loss_weight == 0.0:
            del out["layer_loss_weight"]
        return out

    def supports(self, target: Target) -> str | None:
        """Why this method has no configuration for ``target`` (``None``: it has one)."""
        if self.weights == "uniform" and not float(target.weight_bits).is_integer():
            return f"{self.name} needs a whole weight bit-width, not {target.weight_bits:g}"
        if self.fp8 and (target.weight_bits, target.act_bits) != (8, 8):
            return f"{self.name} is W8A8 only"
        return None


# The rows of the paper's Tables 1 and 3 (the ablation adds one technique per row).
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(name="naive", title="naive PTQ", weights="uniform", acts="uniform", bos_aware=False),
        Method(name="naive+bos", title="+BOS", weights="uniform", acts="uniform", bos_aware=True),
        Method(name="sqnr-mp", title="+MP (SQNR)", weights="sqnr", acts="sqnr", bos_aware=True),
        Method(
            name="fp8",
            title="FP8 e4m3",
            weights="uniform",
            acts="uniform",
            bos_aware=True,
            fp8=True,
        ),  # fmt: skip
        Method(
            name="mixdq-no-bos",
            title="MixDQ w/o BOS",
            weights="mixdq",
            acts="mixdq",
            bos_aware=False,
        ),  # fmt: skip
        Method(name="mixdq", title="MixDQ", weights="mixdq", acts="mixdq", bos_aware=True),
    )
}

# The reconstruction-based rows (Table 1's Q-Diffusion, Table 2's PTQD, and MixDQ's bits with
# learned rounding): `mixdq quantize --method` offers them; they are kept out of ``METHODS``
# so a default study does not grow by the hours reconstruction takes (the study opts in).
# Q-Diffusion and PTQD quantize uniformly without BOS handling, as naive PTQ; PTQD is
# Q-Diffusion's reconstruction plus its noise correction (its experiments start from
# BRECQ/AdaRound-calibrated models). EDA-DM is Q-Diffusion's reconstruction with its two
# parts: calibration samples chosen per step (TDAC) and layer losses inside each block (FBR,
# weight 0.5: the public code's Stable Diffusion setting).
RECONSTRUCTION_METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(name="qdiffusion", title="Q-Diffusion", weights="uniform", acts="uniform",
               bos_aware=False, rounding="adaround"),
        Method(name="ptqd", title="PTQD", weights="uniform", acts="uniform", bos_aware=False,
               rounding="adaround", ptqd=True),
        Method(name="mixdq+adaround", title="MixDQ + AdaRound", weights="mixdq", acts="mixdq",
               bos_aware=True, rounding="adaround"),
        Method(name="edadm", title="EDA-DM", weights="uniform", acts="uniform", bos_aware=False,
               rounding="adaround", calib_select=True, layer_loss_weight=0.5),
    )
}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Quantizer settings the paper leaves open.

    ``symmetric_weights``: symmetric per-channel weights (else asymmetric min/max per
    channel). ``range_method`` / ``momentum``: activation ranges as the running min/max or the
    official EMA of per-batch ranges. ``observe_weight_bits``: the weight bit-width of the
    model whose activations are observed (the official code observes on the W8 model; 16 =
    the float model). The official code's integer-program objective is a knob of the
    allocation (``AllocationKnobs(objective="official")``; ``mixdq quantize --preset
    official`` sets it).
    """

    name: str
    symmetric_weights: bool
    range_method: str
    momentum: float = 0.95
    observe_weight_bits: int = FLOAT_BITS


PRESETS: dict[str, Preset] = {
    "ours": Preset(name="ours", symmetric_weights=False, range_method="minmax"),
    "official": Preset(
        name="official", symmetric_weights=True, range_method="ema", observe_weight_bits=8
    ),
}
