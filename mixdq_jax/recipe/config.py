"""Presets: what the paper states, what the released code does, and ours, as data.

A preset fixes every choice the recipe makes beyond the method and the target: the weight
grid, how activation ranges are observed, how SQNR aggregates, what the integer program
maximises, how A8 is read, and how the final candidate is picked. Three are named for where
their settings come from (docs/departures.md tells each one's source, point by point):

- ``paper``: what the MixDQ paper states (sec. 4.1 and Algorithm 1): asymmetric min-max,
  weights per output channel, activations per tensor, its summed SSIM / SQNR objective; where
  the paper is silent it takes ours (ranges observed on the float model, the pick by image
  MSE on the held-out prompts).
- ``official``: what the released code (thu-nics/MixDQ) does: symmetric weights, ranges by
  its running EMA updated three times a call while activations are quantized at 8 bits on the
  W8 model, SQNR as one ratio of sums, its budget split, A8 as every non-protected layer at
  8 bits (``act_8.00``), the final pick by its uint8 pixel MSE on the first selection prompt.
- ``ours`` (the default): the paper's quantizer with the least-noise-power objective, which
  predicts the image error better on the testbed (docs/recipe.md measures it).

Targets and methods live in `mixdq_jax.methods` (the method registry).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mixdq_jax.allocation.driver import AllocationOptions
from mixdq_jax.quant.qconfig import FLOAT_BITS
from mixdq_jax.sensitivity.config import SQNR_AGGREGATES

SELECTIONS = ("mse", "released")


@dataclass(frozen=True, kw_only=True)
class Preset:
    """Every setting a preset fixes.

    ``symmetric_weights``: symmetric per-channel weights (else asymmetric min/max per
    channel). ``range_method`` / ``momentum`` / ``ema_updates``: activation ranges as the
    running min/max, or the released EMA of per-call ranges (``ema_updates`` updates per call:
    the released quantizer updates once per bit-width of its ``[2, 4, 8]`` list).
    ``observe_weight_bits`` / ``observe_act_bits``: the model whose activations are observed
    (16: float; the released loop observes on the W8 model with 8-bit activations quantized
    by the running ranges). ``sqnr``: ``"mean_db"`` (mean of per-prompt dB) or
    ``"ratio_of_sums"``. ``objective`` / ``budget_rule`` / ``act_average``: the allocation's
    defaults (`AllocationOptions`; ``act_average`` ``None``: ours, 7.7 capped to fit A8).
    ``selection``: ``"mse"`` (image MSE vs float on every held-out prompt) or ``"released"``
    (the released pick: the first prompt only, MSE of uint8 images computed in uint8).
    """

    name: str
    symmetric_weights: bool
    range_method: str
    momentum: float = 0.95
    ema_updates: int = 1
    observe_weight_bits: int = FLOAT_BITS
    observe_act_bits: int = FLOAT_BITS
    sqnr: str = "mean_db"
    objective: str = "noise"
    budget_rule: str = "ours"
    act_average: float | None = None
    selection: str = "mse"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("selection", self.selection, SELECTIONS),
            ("range_method", self.range_method, ("minmax", "ema")),
            ("sqnr", self.sqnr, SQNR_AGGREGATES),
        ):
            if value not in allowed:
                raise ValueError(f"preset {self.name}: {name} {value!r} not in {allowed}")

    def knobs(self, **overrides: Any) -> AllocationOptions:
        """The allocation options of this preset; ``overrides`` given as ``None`` keep the
        preset's value (so `mixdq quantize`, `mixdq allocate` and `mixdq demo` share one set
        of defaults)."""
        values = {"objective": self.objective, "act_average": self.act_average,
                  "budget_rule": self.budget_rule}  # fmt: skip
        values.update({k: v for k, v in overrides.items() if v is not None})
        return AllocationOptions(**values)

    def settings(self) -> dict[str, Any]:
        """What a resumed run must match: the fields, the ones added later only where they
        differ from their defaults (so runs recorded before them still resume)."""
        out = asdict(self)
        for f in fields(self):
            if f.name in _LATER and out[f.name] == f.default:
                del out[f.name]
        return out


_LATER = frozenset(
    {"ema_updates", "observe_act_bits", "sqnr", "objective", "budget_rule", "act_average",
     "selection"}
)  # fmt: skip

PRESETS: dict[str, Preset] = {
    "paper": Preset(name="paper", symmetric_weights=False, range_method="minmax",
                    objective="official"),
    "official": Preset(
        name="official", symmetric_weights=True, range_method="ema", ema_updates=3,
        observe_weight_bits=8, observe_act_bits=8, sqnr="ratio_of_sums", objective="official",
        budget_rule="official", act_average=8.0, selection="released",
    ),
    "ours": Preset(name="ours", symmetric_weights=False, range_method="minmax"),
}  # fmt: skip
DEFAULT_PRESET = "ours"
