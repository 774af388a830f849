"""A method's number format: how the quantized values are represented.

``int`` is the integer grid of `pallas_kernels.grid` (asymmetric or symmetric per the
preset), the one every packed export holds; ``fp8`` is FP8 e4m3 at W8A8, a fake-quant
baseline (Table 2, Fig. 9) with no packed export. A new format (group-wise 4-bit with a
low-rank branch, ...) is one more instance here plus its grid and packer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixdq_jax.methods.target import Target


@dataclass(frozen=True, kw_only=True)
class Format:
    """``exportable``: has a packed export; ``only``: the one target it has (``None``:
    any); ``uniform_only``: every layer at one bit-width, no refiners."""

    name: str
    exportable: bool = True
    only: str | None = None
    uniform_only: bool = False

    def supports(self, target: Target) -> str | None:
        if self.only is not None and target.name != self.only:
            return f"is {self.only} only"
        return None

    def check(self, method: Any) -> None:
        """Refuse a `Method` this format cannot carry."""
        if self.uniform_only and method.allocator.name != "uniform":
            raise ValueError(f"method {method.name!r}: {self.name} is a uniform format")
        if self.uniform_only and method.refiners:
            raise ValueError(f"method {method.name!r}: {self.name} has no refiners")

    def spec_options(self, *, symmetric_weights: bool) -> dict[str, Any]:
        """The `QuantSpec` fields this format sets (the preset's weight symmetry for ints)."""
        if self.name == "fp8":
            return {"fp8": True, "symmetric_weights": False}
        return {"fp8": False, "symmetric_weights": symmetric_weights}

    def settings(self) -> dict[str, Any]:
        """What a resumed run must match (``fp8``, as runs before formats recorded it)."""
        if self.name in ("int", "fp8"):
            return {"fp8": self.name == "fp8"}
        return {"format": self.name}


INT = Format(name="int")
FP8 = Format(name="fp8", exportable=False, only="W8A8", uniform_only=True)
