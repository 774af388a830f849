"""``mixdq demo``: the whole MixDQ study on the built-in testbed, as ``make demo`` runs it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mixdq_jax.cli import argtypes
from mixdq_jax.cli.config_file import add_config_option, write_run_settings
from mixdq_jax.cli.format_args import add_lowrank_args, with_lowrank_args
from mixdq_jax.cli.metric_args import add_report_eval_args, report_eval
from mixdq_jax.cli.model_args import add_model_args
from mixdq_jax.cli.preset_args import add_allocation_args, add_preset_arg, allocation_options
from mixdq_jax.cli.quantize import target_arg
from mixdq_jax.cli.recon_args import add_recon_args, recon_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the MixDQ study (calibrate, sweep, allocate, evaluate)")
    add_config_option(p)
    add_model_args(p)
    p.add_argument(
        "--out", type=Path, default=Path("runs/demo"),
        help="run directory: new, empty or an earlier run's (resumes); not inside --model",
    )  # fmt: skip
    p.add_argument(
        "--num-eval", type=argtypes.positive_int, default=64, help="held-out test captions"
    )
    p.add_argument(
        "--num-calib",
        type=argtypes.positive_int,
        default=16,
        help="calibration captions (the sweeps run on all of them)",
    )
    p.add_argument(
        "--steps",
        type=int,
        choices=(1, 2, 4),
        default=1,
        help="sampling steps: 1 (Euler-A trailing, default) or 2/4 (LCM, the paper's LCM rows)",
    )
    p.add_argument("--seed", type=argtypes.seed, default=0, help="image i uses seed+i (0)")
    p.add_argument(
        "--targets", nargs="+", type=target_arg, default=None, metavar="TARGET",
        help="the row groups (default: W8A8 W5A8 W4A8 W4A16 W3.66A16)",
    )  # fmt: skip
    p.add_argument(
        "--methods", nargs="+", default=None, metavar="METHOD",
        help="the rows (default: the paper's rows, naive ... mixdq; add qdiffusion, ptqd, edadm, "
        "mixdq+adaround for the paper's reconstruction baselines, learned with the --recon-* "
        "settings: hours at the authors' settings; or a method a --plugin file registers)",
    )  # fmt: skip
    p.add_argument(
        "--plugin", type=argtypes.existing_file, action="append", default=[], metavar="FILE",
        help="a Python file that registers methods (examples/custom_method.py); repeatable",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="write into a non-empty --out that is not a mixdq run directory (files it does not "
        "write are kept)",
    )  # fmt: skip
    add_preset_arg(p)
    add_allocation_args(p.add_argument_group("bit allocation (as mixdq quantize)"))
    add_recon_args(p)
    add_lowrank_args(p.add_argument_group("the low-rank group format (as mixdq quantize)"))
    add_report_eval_args(p)
    p.set_defaults(func=run)


def methods_named(names: list[str]) -> tuple:
    """The registered methods of ``names``, in the order given, each once (an unknown name:
    ``ValueError`` naming it and the registered ones)."""
    from mixdq_jax.methods import get_method  # noqa: PLC0415

    return tuple(get_method(n) for n in dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.cli.outputs import claim, run_directory  # noqa: PLC0415
    from mixdq_jax.methods import load_plugin  # noqa: PLC0415
    from mixdq_jax.recipe import PRESETS  # noqa: PLC0415
    from mixdq_jax.study import StudyConfig, run_study  # noqa: PLC0415

    if args.seed + args.num_eval - 1 > argtypes.MAX_SEED:
        raise ValueError(
            f"--seed {args.seed}: test image i uses seed+i, and --num-eval {args.num_eval} "
            f"goes past {argtypes.MAX_SEED}; use a smaller --seed"
        )
    for plugin in args.plugin:
        load_plugin(plugin)
    methods = None if args.methods is None else tuple(  # before any work
        with_lowrank_args(m, args) if m.format.lowrank is not None else m
        for m in methods_named(args.methods)
    )
    evaluation = report_eval(args)  # the metrics' weights checked before any work
    start = time.perf_counter()
    with claim(args, run_directory("--out", args.out)):
        write_run_settings(args.out, args)  # OUT/settings.json: the options and their sources
        report = run_study(
            StudyConfig(
                model=args.model,
                run_dir=args.out,
                num_eval=args.num_eval,
                num_calib=args.num_calib,
                seed=args.seed,
                steps=args.steps,
                evaluation=evaluation,
                reconstruction=recon_config(args),
                preset=PRESETS[args.preset],
                knobs=allocation_options(args),
                **({} if methods is None else {"methods": methods}),
                **({} if args.targets is None else {"targets": tuple(dict.fromkeys(args.targets))}),
            )
        )
    minutes = (time.perf_counter() - start) / 60
    print(f"\nreport: {report / 'report.md'} ({minutes:.1f} min)")
    print((report / "report.md").read_text())
    return 0
