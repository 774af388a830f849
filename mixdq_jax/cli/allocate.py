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
from pathlib import Path

from mixdq_jax import official_format
from mixdq_jax.cli import argtypes
from mixdq_jax.cli.outputs import (
    claim,
    output_file,
    output_folder,
    read_json_quietly,
    run_directory,
)
from mixdq_jax.cli.preset_args import add_preset_arg

KINDS = ("weight", "act")


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
        type=argtypes.existing_dir,
        metavar="DIR",
        help="folder with <kind>_sqnr.yaml and <kind>_ssim.yaml",
    )
    src.add_argument(
        "--run",
        type=argtypes.existing_dir,
        metavar="RUN",
        help="a run directory of `mixdq sensitivity`: its sensitivity files, and layer sizes "
        "from the calibrated model (weight elements or input-activation elements)",
    )
    p.add_argument(
        "--sizes",
        type=argtypes.existing_file,
        metavar="FILE",
        help="per-layer sizes (official tensor_ratio format); defines the layers "
        "(required with --sensitivity)",
    )
    p.add_argument("--kind", choices=KINDS, required=True)
    p.add_argument(
        "--target",
        type=argtypes.positive_float,
        required=True,
        metavar="BITS",
        help="overall size-weighted average bit-width of the non-protected layers",
    )
    k = p.add_mutually_exclusive_group()
    k.add_argument(
        "--k", type=argtypes.positive_float, default=1.0,
        help="b_content / b_quality, > 0 (default 1.0)",
    )  # fmt: skip
    k.add_argument(
        "--k-sweep",
        action="store_true",
        help="solve the official (B, k) grid; --out is then a folder",
    )
    p.add_argument(
        "--b-delta",
        type=argtypes.nonneg_float,
        default=0.3,
        help="with --k-sweep: budgets B in [target - delta, target] (default 0.3)",
    )
    p.add_argument(
        "--b-num", type=argtypes.positive_int, default=10,
        help="with --k-sweep: number of budgets B (default 10)",
    )  # fmt: skip
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
        type=argtypes.existing_file,
        metavar="FILE",
        help="YAML list of layers kept in float (absent from the output)",
    )
    p.add_argument(
        "--protect-top",
        type=argtypes.float_in(0.0, 100.0, "a percentage"),
        default=None,
        metavar="PCT",
        help="also keep in float the PCT%% most sensitive layers of each group "
        "(lowest score at --protect-bits; default: 1 for --kind act, the paper's and mixdq "
        "quantize's, 0 for --kind weight)",
    )
    p.add_argument(
        "--protect-bits",
        type=int,
        choices=(2, 4, 8),
        default=8,
        help="bit-width whose scores rank the layers for --protect-top (default 8, the "
        "official rule)",
    )
    add_preset_arg(p)
    p.add_argument(
        "--objective",
        choices=("official", "noise"),
        default=None,
        help="what the integer program maximises: official = summed SSIM / SQNR dB (the "
        "paper's and the released code's), noise = least summed quantization noise power "
        "(default: the preset's, as mixdq quantize)",
    )
    p.add_argument(
        "--budget-rule",
        choices=("ours", "official"),
        default=None,
        help="how --target is split between the groups: ours = the non-protected layers "
        "average --target; official = the released split, which counts the protected layers' "
        "sizes in the content/quality ratio (default: the preset's; official for "
        "--preset official)",
    )
    p.add_argument(
        "--band",
        type=argtypes.positive_float,
        default=0.02,
        help="each group's average lands in budget +- band (default 0.02)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="FILE.yaml|DIR",
        help="the config to write; with --k-sweep a folder of candidates (new, empty or an "
        "earlier sweep's)",
    )
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing --out file, or write candidates into a non-empty folder that "
        "is not an earlier sweep (files it does not write are kept)",
    )  # fmt: skip
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace):
    """The allocation options the flags describe, the rest from ``--preset`` (the same
    defaults as `mixdq quantize`)."""
    from mixdq_jax.recipe import PRESETS  # noqa: PLC0415  (fast --help)

    return PRESETS[args.preset].knobs(
        k=None if args.k_sweep else args.k,
        b_delta=args.b_delta,
        b_num=args.b_num,
        content_bits=args.content_bits,
        quality_bits=args.quality_bits,
        # weights keep no layer float (MixDQ protects activations only), as mixdq quantize
        protect_top=0.0 if args.kind == "weight" and args.protect_top is None else args.protect_top,
        protect_bits=args.protect_bits,
        band=args.band,
        objective=args.objective,
        budget_rule=args.budget_rule,
    )


def _is_sweep(folder: Path) -> bool:
    """An earlier ``--k-sweep`` output: its ``index.json``."""
    index = read_json_quietly(folder / "index.json")
    return isinstance(index, dict) and isinstance(index.get("candidates"), list)


def _allocate(args: argparse.Namespace, options, files):
    """Read the inputs, solve and write (the targets claimed by the caller)."""
    sensitivity_dir, sizes_path = args.sensitivity, args.sizes
    if args.run is not None:
        from mixdq_jax.rundir import RunDir  # noqa: PLC0415

        sensitivity_dir = RunDir(args.run).sensitivity_dir
        if sizes_path is None:
            sizes_path = files.run_sizes(args.run, args.kind)
    inputs = files.load_inputs(
        kind=args.kind,
        sensitivity_dir=sensitivity_dir,
        sizes_path=sizes_path,
        protect_path=args.protect,
    )
    return files.allocate(inputs, options, args.out, target=args.target)


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.allocation import files  # noqa: PLC0415  (keeps --help fast)

    options = options_from_args(args)
    files.check_out(args.out, options)
    if args.run is None and args.sizes is None:
        raise ValueError("--sizes FILE is required with --sensitivity (or use --run RUN)")
    out = (output_file("--out", args.out) if options.k is not None else
           output_folder("--out", args.out, own=_is_sweep, writes=("index.json",)))  # fmt: skip
    # --run without --sizes: the run's layer sizes are written into it (RUN/sensitivity/...)
    writes_run = args.run is not None and args.sizes is None
    if writes_run and not (args.run / "calib" / "meta.json").is_file():
        raise FileNotFoundError(
            f"--run {args.run}: not a calibrated run directory (no calib/meta.json); run "
            f"`mixdq calibrate --run {args.run}` and `mixdq sensitivity --run {args.run}` first, "
            "or give --sensitivity DIR --sizes FILE"
        )
    targets = (run_directory("--run", args.run), out) if writes_run else (out,)
    with claim(args, *targets):
        result = _allocate(args, options, files)
    if result.inputs.protected:
        print(f"kept in float: {', '.join(sorted(result.inputs.protected))}")
    for candidate in result.candidates:
        print(files.summary(candidate, result.allocator, result.inputs))
    if options.k is not None:
        print(f"wrote {args.out}")
    else:
        print(
            f"wrote {len(result.candidates)} candidate configs and index.json to {args.out}; "
            "the final pick needs an image evaluation of each",
            file=sys.stderr,
        )
    return 0
