"""``mixdq demo``: the whole MixDQ study on the built-in testbed, as ``make demo`` runs it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mixdq_jax.cli.metric_args import add_report_eval_args, report_eval


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the MixDQ study (calibrate, sweep, allocate, evaluate)")
    p.add_argument("--model", default="testbed")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory")
    p.add_argument("--num-eval", type=int, default=64, help="held-out test captions")
    p.add_argument(
        "--num-calib",
        type=int,
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
    p.add_argument("--seed", type=int, default=0)
    add_report_eval_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.io_utils import exclusive_lock  # noqa: PLC0415
    from mixdq_jax.study import StudyConfig, run_study  # noqa: PLC0415

    evaluation = report_eval(args)  # the metrics' weights checked before any work
    start = time.perf_counter()
    with exclusive_lock(args.out, "run directory"):
        report = run_study(
            StudyConfig(
                model=args.model,
                run_dir=args.out,
                num_eval=args.num_eval,
                num_calib=args.num_calib,
                seed=args.seed,
                steps=args.steps,
                evaluation=evaluation,
            )
        )
    minutes = (time.perf_counter() - start) / 60
    print(f"\nreport: {report / 'report.md'} ({minutes:.1f} min)")
    print((report / "report.md").read_text())
    return 0
