"""``mixdq allocate``: mixed-precision bit-widths from per-layer sensitivities.

Inputs come from files in the official MixDQ format: a folder with ``<kind>_sqnr.yaml`` (every
layer) and ``<kind>_ssim.yaml`` (the content layers), and a sizes file (``tensor_ratio``). The
layers to allocate are those of the sizes file. With ``--k`` (default 1: both groups get the
same average) one configuration is written to ``--out``; with ``--k-sweep`` Algorithm 1's
(B, k) grid is solved and every candidate is written into the folder ``--out`` with an
``index.json``, for an image evaluation to pick from.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mixdq_jax import official_format
from mixdq_jax.allocation import (
    ACT_K_SWEEP,
    OFFICIAL_CANDIDATES,
    WEIGHT_K_SWEEP,
    Candidate,
    GroupAllocator,
    budget_sweep,
    is_content_layer,
    most_sensitive,
)
from mixdq_jax.io_utils import atomic_write_json

KINDS = ("weight", "act")


@dataclass(frozen=True, kw_only=True)
class AllocationInputs:
    """Everything the allocation needs, whatever source it was loaded from."""

    kind: str
    sizes: Mapping[str, float]  # every layer to place, protected ones included
    content: Mapping[str, tuple[float, ...]]  # SSIM, content layers
    quality: Mapping[str, tuple[float, ...]]  # SQNR, quality layers
    protected: frozenset[str]  # kept in float: absent from the output


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    unsupported = [b for b in bits if b not in official_format.SUPPORTED_BITS]
    if not bits or unsupported:
        raise argparse.ArgumentTypeError(
            f"bit-widths must be among {list(official_format.SUPPORTED_BITS)}, got {text!r}"
        )
    return bits


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "allocate",
        help="choose per-layer bit-widths by integer programming",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--sensitivity",
        type=Path,
        metavar="DIR",
        help="folder with <kind>_sqnr.yaml and <kind>_ssim.yaml",
    )
    src.add_argument(
        "--run",
        type=Path,
        metavar="RUN",
        help="a run directory of `mixdq sensitivity`: its sensitivity files, and layer sizes "
        "from the calibrated model (weight elements or input-activation elements)",
    )
    p.add_argument(
        "--sizes",
        type=Path,
        metavar="FILE",
        help="per-layer sizes (official tensor_ratio format); defines the layers "
        "(required with --sensitivity)",
    )
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument(
        "--target",
        type=float,
        required=True,
        metavar="BITS",
        help="overall size-weighted average bit-width of the non-protected layers",
    )
    k = p.add_mutually_exclusive_group()
    k.add_argument("--k", type=float, default=1.0, help="b_content / b_quality (default 1.0)")
    k.add_argument(
        "--k-sweep",
        action="store_true",
        help="solve the official (B, k) grid; --out is then a folder",
    )
    p.add_argument(
        "--b-delta",
        type=float,
        default=0.3,
        help="with --k-sweep: budgets B in [target - delta, target] (default 0.3)",
    )
    p.add_argument(
        "--b-num", type=int, default=10, help="with --k-sweep: number of budgets B (default 10)"
    )
    p.add_argument(
        "--content-bits",
        type=_bits_list,
        metavar="2,4,8",
        help="content candidates (default: weight 2,4,8; act 4,8)",
    )
    p.add_argument(
        "--quality-bits", type=_bits_list, metavar="4,8", help="quality candidates (default 4,8)"
    )
    p.add_argument(
        "--protect",
        type=Path,
        metavar="FILE",
        help="YAML list of layers kept in float (absent from the output)",
    )
    p.add_argument(
        "--protect-top",
        type=float,
        default=0.0,
        metavar="PCT",
        help="also keep in float the PCT%% most sensitive layers of each group "
        "(lowest score at the group's lowest candidate bit-width)",
    )
    p.add_argument(
        "--band",
        type=float,
        default=0.02,
        help="each group's average lands in budget +- band (default 0.02)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE.yaml|DIR",
        help="the config to write; with --k-sweep a folder of candidates",
    )
    p.set_defaults(func=run)


def _require(problems: Sequence[str], message: str) -> None:
    """Raise one error listing every offending layer, not just the first."""
    if problems:
        raise ValueError(f"{message} ({len(problems)}): {', '.join(problems)}")


def load_from_files(
    *, kind: str, sensitivity_dir: Path, sizes_path: Path, protect_path: Path | None
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


def _summary(candidate: Candidate, allocator: GroupAllocator, inputs: AllocationInputs) -> str:
    lines = [
        f"{inputs.kind}: target {candidate.target:.4f} k {candidate.k:.4f} "
        f"(r = P_content/P_quality = {allocator.ratio:.4f})"
    ]
    for name, metric, program, alloc in (
        ("content", "ssim", allocator.content, candidate.content),
        ("quality", "sqnr", allocator.quality, candidate.quality),
    ):
        lines.append(
            f"  {name}: {len(program.names):4d} layers  bits {list(program.candidates)}  "
            f"budget {alloc.budget:.4f}  avg {alloc.avg_bits:.4f}  "
            f"sum {metric} {alloc.sensitivity:.4f}  solve {alloc.solve_seconds:.3f} s"
        )
    lines.append(
        f"  overall: {len(candidate.bits):4d} layers  avg {candidate.avg_bits(inputs.sizes):.4f}"
        f"  float (protected): {len(inputs.protected)}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.k_sweep and args.out.suffix in (".yaml", ".yml"):
        raise ValueError(f"with --k-sweep, --out is a folder, got {args.out}")
    if not 0.0 <= args.protect_top <= 100.0:
        raise ValueError(f"--protect-top is a percentage in [0, 100], got {args.protect_top}")
    sensitivity_dir, sizes_path = args.sensitivity, args.sizes
    if args.run is not None:
        sensitivity_dir = args.run / "sensitivity"
        if sizes_path is None:
            sizes_path = write_run_sizes(args.run, args.kind)
    elif sizes_path is None:
        raise ValueError("--sizes FILE is required with --sensitivity (or use --run RUN)")
    inputs = load_from_files(
        kind=args.kind,
        sensitivity_dir=sensitivity_dir,
        sizes_path=sizes_path,
        protect_path=args.protect,
    )
    return allocate(inputs, args)


def write_run_sizes(run: Path, kind: str) -> Path:
    """``RUN/sensitivity/<kind>_sizes.yaml`` from the calibrated model's layer registry.

    Sizes are element counts (weights without bias, or one sample's input activation), the
    quantities the official ratio files hold up to a constant factor.
    """
    import json  # noqa: PLC0415

    from mixdq_jax.quant.registry import registry_from_unet_config  # noqa: PLC0415

    meta_path = run / "calib" / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not a calibrated run directory")
    source = Path(json.loads(meta_path.read_text())["source"])
    config = source / "unet" / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: the run's model folder is gone; pass --sizes FILE")
    sizes = {
        layer.name: float(layer.weight_params if kind == "weight" else layer.input_size)
        for layer in registry_from_unet_config(config)
    }
    path = run / "sensitivity" / f"{kind}_sizes.yaml"
    official_format.write_sizes(path, sizes)
    return path


def allocate(inputs: AllocationInputs, args: argparse.Namespace) -> int:
    """Protect, solve and write, whatever source ``inputs`` came from."""
    default_content, default_quality = OFFICIAL_CANDIDATES[inputs.kind]
    content_bits = args.content_bits or default_content
    quality_bits = args.quality_bits or default_quality

    protected = set(inputs.protected)
    if args.protect_top:
        fraction = args.protect_top / 100.0
        protected |= set(most_sensitive(inputs.content, fraction=fraction, bits=min(content_bits)))
        protected |= set(most_sensitive(inputs.quality, fraction=fraction, bits=min(quality_bits)))
    inputs = AllocationInputs(
        kind=inputs.kind,
        sizes=inputs.sizes,
        content={n: s for n, s in inputs.content.items() if n not in protected},
        quality={n: s for n, s in inputs.quality.items() if n not in protected},
        protected=frozenset(protected),
    )
    allocator = GroupAllocator(
        content_sensitivity=inputs.content,
        quality_sensitivity=inputs.quality,
        sizes=inputs.sizes,
        content_candidates=content_bits,
        quality_candidates=quality_bits,
    )
    if protected:
        print(f"kept in float: {', '.join(sorted(protected))}")

    if not args.k_sweep:
        candidate = allocator.allocate(args.target, args.k, band=args.band)
        official_format.write_bits(args.out, candidate.bits)
        print(_summary(candidate, allocator, inputs))
        print(f"wrote {args.out}")
        return 0

    ks = WEIGHT_K_SWEEP if inputs.kind == "weight" else ACT_K_SWEEP
    targets = budget_sweep(args.target, delta=args.b_delta, num=args.b_num)
    candidates = allocator.sweep(targets=targets, ks=ks, band=args.band)
    if not candidates:
        raise ValueError(
            f"no (B, k) combination of the sweep is feasible: B in {targets[0]:.3f}.."
            f"{targets[-1]:.3f}, k in {ks[0]:.3f}..{ks[-1]:.3f}, content bits "
            f"{list(content_bits)}, quality bits {list(quality_bits)}"
        )
    index = []
    for candidate in candidates:
        name = f"{inputs.kind}_B{candidate.target:.3f}_k{candidate.k:.3f}.yaml"
        official_format.write_bits(args.out / name, candidate.bits)
        index.append(
            {
                "file": name,
                "target": candidate.target,
                "k": candidate.k,
                "avg_bits": candidate.avg_bits(inputs.sizes),
                "content": {
                    "avg_bits": candidate.content.avg_bits,
                    "sum_ssim": candidate.content.sensitivity,
                },
                "quality": {
                    "avg_bits": candidate.quality.avg_bits,
                    "sum_sqnr": candidate.quality.sensitivity,
                },
            }
        )
        print(_summary(candidate, allocator, inputs))
    atomic_write_json(
        args.out / "index.json",
        {
            "kind": inputs.kind,
            "protected": sorted(inputs.protected),
            "candidates": index,
        },
    )
    print(
        f"wrote {len(candidates)} candidate configs and index.json to {args.out}; "
        "the final pick needs an image evaluation of each",
        file=sys.stderr,
    )
    return 0
