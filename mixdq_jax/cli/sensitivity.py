"""``mixdq sensitivity``: per-layer sensitivity sweep (or orthogonality) of a calibrated run."""

from __future__ import annotations

import argparse
from contextlib import AbstractContextManager
from pathlib import Path

from mixdq_jax.cli import argtypes
from mixdq_jax.cli.argtypes import (
    bits_list,
    existing_file,
    nonneg_int,
    positive_float,
    positive_int,
)
from mixdq_jax.cli.model_args import add_model_args
from mixdq_jax.cli.outputs import claim, run_directory
from mixdq_jax.cli.quant_args import add_dtype_arg, resolve_dtype
from mixdq_jax.quant.qconfig import QUANT_BITS
from mixdq_jax.rundir import RunDir

METRIC_CHOICES = ("mixdq", "sqnr", "ssim", "both", "orthogonality")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sensitivity",
        help="per-layer sensitivity sweep (SQNR / SSIM) or orthogonality on a calibrated run",
        description="Quantize each layer alone at each bit-width (weights or activations) and "
        "measure it; writes RUN/sensitivity/<kind>_<metric>.yaml in the official MixDQ format. "
        "Resumable: finished chunks are kept. Uses every JAX device (the configurations are "
        "sharded); on a cluster run it on every host with --distributed.",
    )
    add_model_args(p)
    p.add_argument("--run", type=Path, required=True, help="a calibrated run directory")
    p.add_argument("--kind", choices=["weight", "act", "both"], default="both")
    p.add_argument(
        "--bits",
        type=bits_list(QUANT_BITS),
        default=(2, 4, 8),
        help="candidate bits (default 2,4,8)",
    )
    p.add_argument(
        "--metric",
        choices=METRIC_CHOICES,
        default="mixdq",
        help="mixdq: SQNR for every layer + SSIM for content layers (as the official release); "
        "sqnr: SQNR only (the MP-only baseline); ssim: SSIM for every layer; both: SQNR and "
        "SSIM for every layer; orthogonality: MPQ-Diff's network-orthogonality importance",
    )
    p.add_argument("--chunk", type=positive_int, default=8, help="configurations per batched call")
    p.add_argument(
        "--layers",
        type=existing_file,
        default=None,
        help="sweep only these layers: a YAML list of names (default: every layer)",
    )
    p.add_argument(
        "--scheduler",
        type=argtypes.scheduler_name,
        default=None,
        help="the scheduler used for calibration",
    )
    add_dtype_arg(p)
    p.add_argument(
        "--format",
        dest="quant_format",
        choices=["int", "fp8"],
        default="int",
        help="quantizer format (fp8: FP8 e4m3)",
    )
    p.add_argument("--symmetric-weights", action="store_true")
    p.add_argument("--no-bos-aware", dest="bos_aware", action="store_false")
    p.add_argument("--no-shortcut-split", dest="shortcut_split", action="store_false")
    p.add_argument(
        "--num-timesteps",
        type=positive_int,
        default=4,
        help="orthogonality: sampled steps (uniform)",
    )
    p.add_argument(
        "--beta", type=positive_float, default=1.0, help="orthogonality: exp(-beta * ORM)"
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host: run on every host; "
        "SLURM / Open MPI / Kubernetes are detected, else give the next three options)",
    )
    p.add_argument("--coordinator", default=None, help="with --distributed: HOST:PORT of rank 0")
    p.add_argument("--num-processes", type=positive_int, default=None, help="with --distributed")
    p.add_argument("--process-id", type=nonneg_int, default=None, help="with --distributed")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.distributed:
        import jax  # noqa: PLC0415

        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    run = RunDir(args.run)
    if not run.act_ranges_path.is_file():
        raise FileNotFoundError(
            f"--run {args.run}: not a calibrated run directory (no calib/act_ranges.npz); run "
            f"`mixdq calibrate --model {args.model} --run {args.run}` first"
        )
    layers = None
    if args.layers is not None:  # read before the model loads: a bad file fails at once
        from mixdq_jax.official_format import read_layer_list  # noqa: PLC0415

        layers = tuple(read_layer_list(args.layers))
    with _run_lock(args):
        _sensitivity(args, run, layers)
    suffix = ".yaml" if tuple(args.bits) == (2, 4, 8) else ".json"
    files = ", ".join(p.name for p in sorted(run.sensitivity_dir.glob(f"*{suffix}")))
    print(f"sensitivity files in {run.sensitivity_dir}: {files}")
    return 0


def _run_lock(args: argparse.Namespace) -> AbstractContextManager:
    """The run directory checked (`outputs.claim`) and locked; with --distributed only
    process 0 takes the lock (every host runs the same command on a shared run directory,
    and only process 0 writes)."""
    writer = True
    if args.distributed:
        import jax  # noqa: PLC0415

        writer = jax.process_index() == 0
    return claim(args, run_directory("--run", args.run), lock=writer)


def _sensitivity(args: argparse.Namespace, run: RunDir, layers: tuple[str, ...] | None) -> None:
    """Load the model and run the sweep (or orthogonality) into ``run`` (locked by the caller)."""
    from mixdq_jax.api import load_pipeline  # noqa: PLC0415  (keeps --help fast)
    from mixdq_jax.quant.qconfig import QuantSpec  # noqa: PLC0415
    from mixdq_jax.sensitivity import (  # noqa: PLC0415
        OrthogonalityConfig,
        SweepConfig,
        orthogonality,
        sweep,
    )

    kinds = ("weight", "act") if args.kind == "both" else (args.kind,)
    pipe = load_pipeline(args.model, scheduler=args.scheduler, dtype=resolve_dtype(args.dtype))
    pipe = pipe.without_text_encoders()  # the run's stored conditioning replaces them
    if args.metric == "orthogonality":
        config = OrthogonalityConfig(
            bits=args.bits, num_timesteps=args.num_timesteps, beta=args.beta
        )
        result = orthogonality(pipe, args.run, config, kinds=kinds)
        print(
            f"orthogonality of {len(result.names)} layers at steps {list(result.steps)}"
            + (f" ({len(result.degenerate)} without sample variation)" if result.degenerate else "")
        )
        return
    spec = QuantSpec(
        symmetric_weights=args.symmetric_weights,
        fp8=args.quant_format == "fp8",
        bos_aware=args.bos_aware,
        shortcut_split=args.shortcut_split,
    )
    metrics = {"both": ("sqnr", "ssim")}.get(args.metric, args.metric)
    config = SweepConfig(
        kinds=kinds, bits=args.bits, metrics=metrics, chunk=args.chunk, spec=spec, layers=layers
    )
    results = sweep(pipe, run, config, progress=args.progress)
    for (kind, metric), scores in results.items():
        print(f"{kind} {metric}: {len(scores)} layers")
