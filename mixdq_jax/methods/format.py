"""A method's number format: how the quantized values are represented.

``int`` is the integer grid of `pallas_kernels.grid` (asymmetric or symmetric per the
preset), the one every packed export holds; ``fp8`` is FP8 e4m3 at W8A8, a fake-quant
baseline (Table 2, Fig. 9) with no packed export; ``int-group-lowrank`` is SVDQuant's
(Li et al., ICLR 2025): weights and activations (per token, at run time) in groups of 64
input channels, smoothing, and a 16-bit rank-32 branch on the layers at 4 bits or fewer
(`mixdq_jax.quant.lowrank`), whose per-layer data a search on the calibration inputs
prepares (`mixdq_jax.methods.lowrank`) before the sweeps. A new format is one more instance
here plus its grid and packer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mixdq_jax.methods.target import Target
from mixdq_jax.quant.lowrank import ALPHAS, LOWRANK_BITS, LowRank, fraction_rank


@dataclass(frozen=True, kw_only=True)
class LowRankSettings:
    """The low-rank branch's search: ``rank`` (SVDQuant: 32), the migration strengths
    ``alphas`` tried per layer, ``rows`` calibration patch rows per layer it scores them on,
    at ``search_bits`` = (weight, activation) bits (the branch's own: W4A4).

    ``rank_fraction``: instead of one rank, each layer's rank is the one whose branch holds
    that fraction of the layer's weights, ``round(f K N / (K + N))`` (at least 1, at most
    ``rank``). Why: rank 32 on SDXL's 1280-wide layers is f = 0.05, but on a small model it
    is the whole matrix (the testbed's layers are 32-64 wide), a 16-bit copy of the weights.
    """

    rank: int = 32
    rank_fraction: float | None = None
    alphas: tuple[float, ...] = ALPHAS
    rows: int = 256
    search_bits: tuple[int, int] = (LOWRANK_BITS, 4)

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        object.__setattr__(self, "search_bits", tuple(int(b) for b in self.search_bits))
        if self.rank < 1 or self.rows < 1 or not self.alphas:
            raise ValueError("LowRankSettings: rank >= 1, rows >= 1 and at least one alpha")
        if any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError(f"LowRankSettings: alphas must lie in [0, 1]: {self.alphas}")
        if self.rank_fraction is not None and not 0.0 < self.rank_fraction < 1.0:
            raise ValueError(f"LowRankSettings: rank_fraction {self.rank_fraction} not in (0, 1)")

    def layer_rank(self, k: int, n: int) -> int:
        """The branch's rank for a ``[k, n]`` layer GEMM."""
        return fraction_rank(k, n, self.rank, self.rank_fraction)


@dataclass(frozen=True, kw_only=True)
class Format:
    """``exportable``: has a packed export; ``only``: the one target it has (``None``:
    any); ``uniform_only``: every layer at one bit-width, no refiners; ``group_size``:
    SVDQuant's groups (``None``: the per-channel / per-tensor grid); ``lowrank``: the branch's
    search (``None``: no branch)."""

    name: str
    exportable: bool = True
    only: str | None = None
    uniform_only: bool = False
    group_size: int | None = None
    lowrank: LowRankSettings | None = None

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

    def spec_options(
        self, *, symmetric_weights: bool, lowrank: Mapping[str, LowRank] | None = None
    ) -> dict[str, Any]:
        """The `QuantSpec` fields this format sets (the preset's weight symmetry for ints;
        ``lowrank``: the per-layer data of `mixdq_jax.methods.lowrank.prepare`)."""
        if self.name == "fp8":
            return {"fp8": True, "symmetric_weights": False}
        if self.group_size is not None:
            if self.lowrank is not None and lowrank is None:
                raise ValueError(f"format {self.name}: its low-rank data was not prepared")
            return {"fp8": False, "symmetric_weights": False, "group_size": self.group_size,
                    "lowrank": lowrank}  # fmt: skip
        return {"fp8": False, "symmetric_weights": symmetric_weights}

    def settings(self) -> dict[str, Any]:
        """What a resumed run must match (``fp8``, as runs before formats recorded it)."""
        if self.name in ("int", "fp8"):
            return {"fp8": self.name == "fp8"}
        out: dict[str, Any] = {"format": self.name, "group_size": self.group_size}
        if self.lowrank is not None:  # as JSON holds it (lists), so a resumed run compares equal
            out["lowrank"] = json.loads(json.dumps(asdict(self.lowrank)))
        return out

    @property
    def tag(self) -> str:
        """The name of this format's files in a run: its name and a short hash of its
        settings, so another rank or group size never reads the files of this one."""
        digest = hashlib.sha1(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()
        return f"{self.name}-{digest[:8]}"

    @property
    def sweeps(self) -> str | None:
        """The folder of this format's sensitivity sweeps (``None``: the run's default, the
        int grid's; FP8 is uniform and sweeps nothing)."""
        return None if self.group_size is None else f"sensitivity-{self.tag}"


INT = Format(name="int")
FP8 = Format(name="fp8", exportable=False, only="W8A8", uniform_only=True)
LOWRANK = Format(name="int-group-lowrank", group_size=64, lowrank=LowRankSettings())
