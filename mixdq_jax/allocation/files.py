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
from mixdq_jax.allocation.budget import Candidate, GroupAllocator, is_content_layer
from mixdq_jax.allocation.driver import AllocationOptions, group_candidates, protected_layers
from mixdq_jax.allocation.milp import summed_sensitivity
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
    """A k-sweep (``options.k is None``) writes a folder, a single allocation a YAML file."""
    if options.k is None and out.suffix in (".yaml", ".yml"):
        raise ValueError(f"with --k-sweep, --out is a folder, got {out}")


def allocate(
    inputs: AllocationInputs, options: AllocationOptions, out: Path, *, target: float
) -> AllocationResult:
    """Protect, solve and write (`driver.protected_layers`, `driver.group_candidates`): one
    configuration at ``options.k`` to the YAML file ``out``, or with ``options.k=None``
    every candidate of the (B, k) sweep plus ``index.json`` into the folder ``out``."""
    check_out(out, options)
    protected = set(inputs.protected) | protected_layers(inputs.content, inputs.quality, options)
    inputs = AllocationInputs(
        kind=inputs.kind,
        sizes=inputs.sizes,
        content={n: s for n, s in inputs.content.items() if n not in protected},
        quality={n: s for n, s in inputs.quality.items() if n not in protected},
        protected=frozenset(protected),
    )
    allocator, candidates = group_candidates(
        inputs.kind, inputs.content, inputs.quality, inputs.sizes, target, options
    )
    if options.k is not None:
        (candidate,) = candidates
        official_format.write_bits(out, candidate.bits)
        return AllocationResult(
            candidates=(candidate,), allocator=allocator, inputs=inputs, files=(out,)
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
