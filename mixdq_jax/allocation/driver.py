"""The one allocation driver: protect, score, split between the groups, solve.

`mixdq allocate` (from official-format files) and the recipe's MixDQ allocator (from a run's
sweeps) both call :func:`protected_layers` and :func:`group_candidates` with one options type,
:class:`AllocationOptions`, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mixdq_jax.allocation.budget import (
    ACT_K_SWEEP,
    OFFICIAL_CANDIDATES,
    WEIGHT_K_SWEEP,
    Candidate,
    GroupAllocator,
    budget_sweep,
    check_budget_rule,
    most_sensitive,
)
from mixdq_jax.allocation.objectives import check_objective, program_scores

Scores = Mapping[str, Sequence[float]]
KINDS = ("weight", "act")


@dataclass(frozen=True, kw_only=True)
class AllocationOptions:
    """Algorithm 1's settings (official defaults but the objective).

    ``protect_top``: percent of layers per group kept float, the lowest-scoring at
    ``protect_bits`` (the official rule for activations: exactly its 9 float layers on
    SDXL-turbo). ``k``: one split ``b_content / b_quality``; ``None``: the official (B, k)
    sweep with B in ``[budget - b_delta, budget]`` (``b_num`` budgets) and the kind's k grid.
    Each group's average lands within ``band`` of its budget. ``content_bits`` /
    ``quality_bits``: candidates (``None``: the official ones of the kind). ``objective``:
    what the integer program maximises (`objectives`): ``"noise"`` (least summed noise power,
    measured to predict the image error far better on the testbed, README) or ``"official"``
    (the paper's summed SSIM / SQNR dB). ``act_average``: for an A8 target, the average bits of
    the non-protected activation layers (``None``: the paper's 7.7, lowered where the float
    layers need it; `mixdq_jax.methods.act_budget`). ``budget_rule``: how B is split between
    the groups (`mixdq_jax.allocation.budget`): ``"ours"`` sums the sizes in ``r`` over the
    allocated layers, so B is their average; ``"official"`` over every layer, the protected
    ones too, as the released ``integer_programming.py`` (``ssim2sqnr_ratio`` into
    ``get_mean_bit``), and solves the (B, k) points its loop solves.
    """

    protect_top: float = 1.0
    protect_bits: int = 8
    k: float | None = None
    b_delta: float = 0.3
    b_num: int = 10
    band: float = 0.02
    content_bits: tuple[int, ...] | None = None
    quality_bits: tuple[int, ...] | None = None
    objective: str = "noise"
    act_average: float | None = None
    budget_rule: str = "ours"

    def __post_init__(self) -> None:
        check_objective(self.objective)
        check_budget_rule(self.budget_rule)
        if not 0.0 <= self.protect_top <= 100.0:
            raise ValueError(f"protect_top {self.protect_top} is a percentage in [0, 100]")
        if self.protect_bits not in (2, 4, 8):
            raise ValueError(f"protect_bits {self.protect_bits}: scores exist at 2, 4, 8 bits")
        if self.b_num < 1 or self.b_delta < 0 or self.band <= 0:
            raise ValueError("need b_num >= 1, b_delta >= 0 and band > 0")
        if self.k is not None and not self.k > 0:
            raise ValueError(f"k {self.k} must be > 0")
        if self.act_average is not None and not 2.0 <= self.act_average <= 8.0:
            raise ValueError(f"act_average {self.act_average} outside the [2, 8] range")


def protected_layers(content: Scores, quality: Scores, options: AllocationOptions) -> set[str]:
    """The ``protect_top`` percent lowest-scoring layers of each group at ``protect_bits``
    (content scored by SSIM, quality by SQNR)."""
    if not options.protect_top:
        return set()
    fraction, bits = options.protect_top / 100.0, options.protect_bits
    return set(most_sensitive(content, fraction=fraction, bits=bits)) | set(
        most_sensitive(quality, fraction=fraction, bits=bits)
    )


def group_allocator(
    kind: str, content: Scores, quality: Scores, sizes: Mapping[str, float],
    options: AllocationOptions,
) -> GroupAllocator:  # fmt: skip
    """The two groups' integer programs under ``options.objective`` and
    ``options.budget_rule`` (``sizes``: every layer, the protected ones included)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    default_content, default_quality = OFFICIAL_CANDIDATES[kind]
    return GroupAllocator(
        content_sensitivity=program_scores(content, "ssim", options.objective),
        quality_sensitivity=program_scores(quality, "sqnr", options.objective),
        sizes=sizes,
        content_candidates=options.content_bits or default_content,
        quality_candidates=options.quality_bits or default_quality,
        budget_rule=options.budget_rule,
    )


def group_candidates(
    kind: str, content: Scores, quality: Scores, sizes: Mapping[str, float], budget: float,
    options: AllocationOptions,
) -> tuple[GroupAllocator, list[Candidate]]:  # fmt: skip
    """``(allocator, candidates)``: one candidate at ``options.k``, or every feasible point
    of the (B, k) sweep (an error naming the ranges when none is)."""
    allocator = group_allocator(kind, content, quality, sizes, options)
    if options.k is not None:
        return allocator, [allocator.allocate(budget, options.k, band=options.band)]
    ks = WEIGHT_K_SWEEP if kind == "weight" else ACT_K_SWEEP
    targets = budget_sweep(budget, delta=options.b_delta, num=options.b_num)
    candidates = allocator.sweep(targets=targets, ks=ks, band=options.band)
    if not candidates:
        raise ValueError(
            f"{kind} allocation: no (B, k) point of the sweep is feasible: B in "
            f"{targets[0]:.3f}..{targets[-1]:.3f}, k in {ks[0]:.3f}..{ks[-1]:.3f}, content bits "
            f"{list(allocator.content.candidates)}, quality bits "
            f"{list(allocator.quality.candidates)}"
        )
    return allocator, candidates
