"""Allocation from files: official-format sensitivities and sizes in, bit-width configs out.

What ``mixdq allocate`` does, as library calls: :func:`load_inputs` reads and cross-checks
the files, :func:`run_sizes` derives the sizes of a run directory's model, and
:func:`allocate` protects, solves and writes one configuration or the (B, k) candidates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mixdq_jax import official_format
from mixdq_jax.allocation.budget import (
    ACT_K_SWEEP,
    OFFICIAL_CANDIDATES,
    WEIGHT_K_SWEEP,
    Candidate,
    GroupAllocator,
    budget_sweep,
    is_content_layer,
    most_sensitive,
)
from mixdq_jax.allocation.milp import summed_sensitivity
from mixdq_jax.allocation.objectives import check_objective, program_scores
from mixdq_jax.io_utils import atomic_write_json
from mixdq_jax.quant.registry import registry_from_unet_config
from mixdq_jax.rundir import RunDir

KINDS = ("weight", "act")


@dataclass(frozen=True, kw_only=True)
class AllocationInputs:
    """Everything the allocation needs, whatever source it was loaded from."""

    kind: str
    sizes: Mapping[str, float]  # every layer to place, protected ones included
    content: Mapping[str, tuple[float, ...]]  # SSIM, content layers
    quality: Mapping[str, tuple[float, ...]]  # SQNR, quality layers
    protected: frozenset[str]  # kept in float: absent from the output


@dataclass(frozen=True, kw_only=True)
class AllocationOptions:
    """How to allocate. ``k``: b_content / b_quality for one configuration; ``k_sweep``: the
    official (B, k) grid with B in ``[target - b_delta, target]`` (``b_num`` budgets).
    ``content_bits`` / ``quality_bits``: candidates (``None``: the official ones of the kind).
    ``protect_top``: percentage of most sensitive layers per group kept float, ranked by the
    score at ``protect_bits`` (8: the official rule, which gives exactly the official
    protected layers on SDXL-turbo). ``objective``: what the integer program maximises
    (`objectives.OBJECTIVES`; summaries and index.json report the raw summed scores)."""

    target: float
    k: float = 1.0
    k_sweep: bool = False
    b_delta: float = 0.3
    b_num: int = 10
    content_bits: tuple[int, ...] | None = None
    quality_bits: tuple[int, ...] | None = None
    protect_top: float = 0.0
    protect_bits: int = 8
    band: float = 0.02
    objective: str = "official"

    def __post_init__(self) -> None:
        check_objective(self.objective)
        if not 0.0 <= self.protect_top <= 100.0:
            raise ValueError(f"protect_top is a percentage in [0, 100], got {self.protect_top}")


def _require(problems: Sequence[str], message: str) -> None:
    """Raise one error listing every offending layer, not just the first."""
    if problems:
        raise ValueError(f"{message} ({len(problems)}): {', '.join(problems)}")


def load_inputs(
    *, kind: str, sensitivity_dir: Path, sizes_path: Path, protect_path: Path | None = None
) -> AllocationInputs:
    """Read the official-format files and check that they describe the same layers."""
    sqnr_path = sensitivity_dir / f"{kind}_sqnr.yaml"
    ssim_path = sensitivity_dir / f"{kind}_ssim.yaml"
    for path in (sqnr_path, ssim_path, sizes_path):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
    sizes = official_format.read_sizes(sizes_path)
    sqnr = official_format.read_sensitivity(sqnr_path)
    ssim = official_format.read_sensitivity(ssim_path)
    layers = sorted(sizes)
    content = [n for n in layers if is_content_layer(n)]
    _require(
        [n for n in layers if n not in sqnr], f"layers of {sizes_path} missing from {sqnr_path}"
    )
    _require(
        [n for n in content if n not in ssim],
        f"content layers of {sizes_path} missing from {ssim_path}",
    )
    for path, scores in ((sqnr_path, sqnr), (ssim_path, ssim)):
        _require(sorted(set(scores) - set(sizes)), f"layers of {path} not in {sizes_path}")
    protected: list[str] = []
    if protect_path is not None:
        protected = official_format.read_layer_list(protect_path)
        _require(
            [n for n in protected if n not in sizes],
            f"layers of {protect_path} not in {sizes_path}",
        )
    return AllocationInputs(
        kind=kind,
        sizes=sizes,
        content={n: ssim[n] for n in content},
        quality={n: sqnr[n] for n in layers if not is_content_layer(n)},
        protected=frozenset(protected),
    )


def run_sizes(run: str | os.PathLike | RunDir, kind: str) -> Path:
    """``RUN/sensitivity/<kind>_sizes.yaml`` from the calibrated model's layer registry.

    Sizes are element counts (weights without bias, or one sample's input activation), the
    quantities the official ratio files hold up to a constant factor.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    if not run.calib_meta_path.is_file():
        raise FileNotFoundError(f"{run.calib_meta_path}: not a calibrated run directory")
    source = Path(json.loads(run.calib_meta_path.read_text())["source"])
    config = source / "unet" / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: the run's model folder is gone; pass --sizes FILE")
    sizes = {
        layer.name: float(layer.weight_params if kind == "weight" else layer.input_size)
        for layer in registry_from_unet_config(config)
    }
    path = run.sizes_path(kind)
    official_format.write_sizes(path, sizes)
    return path


def summary(candidate: Candidate, allocator: GroupAllocator, inputs: AllocationInputs) -> str:
    """A few lines on a candidate: budgets, averages and summed scores per group."""
    lines = [
        f"{inputs.kind}: target {candidate.target:.4f} k {candidate.k:.4f} "
        f"(r = P_content/P_quality = {allocator.ratio:.4f})"
    ]
    for name, metric, program, alloc in (
        ("content", "ssim", allocator.content, candidate.content),
        ("quality", "sqnr", allocator.quality, candidate.quality),
    ):
        scores = inputs.content if name == "content" else inputs.quality
        lines.append(
            f"  {name}: {len(program.names):4d} layers  bits {list(program.candidates)}  "
            f"budget {alloc.budget:.4f}  avg {alloc.avg_bits:.4f}  "
            f"sum {metric} {summed_sensitivity(alloc.bits, scores):.4f}  "
            f"solve {alloc.solve_seconds:.3f} s"
        )
    lines.append(
        f"  overall: {len(candidate.bits):4d} layers  avg {candidate.avg_bits(inputs.sizes):.4f}"
        f"  float (protected): {len(inputs.protected)}"
    )
    return "\n".join(lines)


@dataclass(frozen=True, kw_only=True)
class AllocationResult:
    """What :func:`allocate` wrote, with the allocator and the inputs after protection."""

    candidates: tuple[Candidate, ...]
    allocator: GroupAllocator
    inputs: AllocationInputs
    files: tuple[Path, ...]


def check_out(out: Path, options: AllocationOptions) -> None:
    """A k-sweep writes a folder, a single allocation a YAML file."""
    if options.k_sweep and out.suffix in (".yaml", ".yml"):
        raise ValueError(f"with --k-sweep, --out is a folder, got {out}")


def allocate(inputs: AllocationInputs, options: AllocationOptions, out: Path) -> AllocationResult:
    """Protect, solve and write: one configuration to the YAML file ``out``, or with
    ``options.k_sweep`` every candidate plus ``index.json`` into the folder ``out``."""
    check_out(out, options)
    default_content, default_quality = OFFICIAL_CANDIDATES[inputs.kind]
    content_bits = options.content_bits or default_content
    quality_bits = options.quality_bits or default_quality

    protected = set(inputs.protected)
    if options.protect_top:
        fraction = options.protect_top / 100.0
        bits = options.protect_bits
        protected |= set(most_sensitive(inputs.content, fraction=fraction, bits=bits))
        protected |= set(most_sensitive(inputs.quality, fraction=fraction, bits=bits))
    inputs = AllocationInputs(
        kind=inputs.kind,
        sizes=inputs.sizes,
        content={n: s for n, s in inputs.content.items() if n not in protected},
        quality={n: s for n, s in inputs.quality.items() if n not in protected},
        protected=frozenset(protected),
    )
    allocator = GroupAllocator(
        content_sensitivity=program_scores(inputs.content, "ssim", options.objective),
        quality_sensitivity=program_scores(inputs.quality, "sqnr", options.objective),
        sizes=inputs.sizes,
        content_candidates=content_bits,
        quality_candidates=quality_bits,
    )
    if not options.k_sweep:
        candidate = allocator.allocate(options.target, options.k, band=options.band)
        official_format.write_bits(out, candidate.bits)
        return AllocationResult(
            candidates=(candidate,), allocator=allocator, inputs=inputs, files=(out,)
        )

    ks = WEIGHT_K_SWEEP if inputs.kind == "weight" else ACT_K_SWEEP
    targets = budget_sweep(options.target, delta=options.b_delta, num=options.b_num)
    candidates = allocator.sweep(targets=targets, ks=ks, band=options.band)
    if not candidates:
        raise ValueError(
            f"no (B, k) combination of the sweep is feasible: B in {targets[0]:.3f}.."
            f"{targets[-1]:.3f}, k in {ks[0]:.3f}..{ks[-1]:.3f}, content bits "
            f"{list(content_bits)}, quality bits {list(quality_bits)}"
        )
    index, files = [], []
    for candidate in candidates:
        name = f"{inputs.kind}_B{candidate.target:.3f}_k{candidate.k:.3f}.yaml"
        official_format.write_bits(out / name, candidate.bits)
        files.append(out / name)
        index.append(
            {
                "file": name,
                "target": candidate.target,
                "k": candidate.k,
                "avg_bits": candidate.avg_bits(inputs.sizes),
                "content": {
                    "avg_bits": candidate.content.avg_bits,
                    "sum_ssim": summed_sensitivity(candidate.content.bits, inputs.content),
                },
                "quality": {
                    "avg_bits": candidate.quality.avg_bits,
                    "sum_sqnr": summed_sensitivity(candidate.quality.bits, inputs.quality),
                },
            }
        )
    atomic_write_json(
        out / "index.json",
        {"kind": inputs.kind, "protected": sorted(inputs.protected), "candidates": index},
    )
    return AllocationResult(
        candidates=tuple(candidates), allocator=allocator, inputs=inputs, files=tuple(files)
    )
