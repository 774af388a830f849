"""``mixdq testbed train``: train the built-in testbed model (``mixdq evaluate`` scores it)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

from mixdq_jax.cli import argtypes


def register(sub: argparse._SubParsersAction) -> None:
    from mixdq_jax.testbed.train import STAGES, TrainConfig  # noqa: PLC0415

    p = sub.add_parser("testbed", help="train the built-in testbed model")
    tsub = p.add_subparsers(dest="testbed_command", required=True)

    t = tsub.add_parser(
        "train",
        help="train the testbed from scratch (judge, VAE, UNet + text encoders) and export it",
        description="Every stage checkpoints into --work-dir; rerunning resumes.",
    )
    t.add_argument(
        "--work-dir",
        type=Path,
        default=Path("testbed_work"),
        help="checkpoints and cached latents (default: ./testbed_work)",
    )
    t.add_argument(
        "--out",
        type=Path,
        default=None,
        help="diffusers folder to write (default: the package's testbed assets)",
    )
    t.add_argument(
        "--judge-out",
        type=Path,
        default=None,
        help="judge weights file (default: the package's assets/judge.safetensors)",
    )
    t.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    for f in dataclasses.fields(TrainConfig):
        t.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=_train_type(f.name, f.default),
            default=f.default,
            help=f"(default: {f.default})",
        )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_train)


def _train_type(name: str, default: object) -> Callable[[str], object]:
    """The range-checked argument type of a `TrainConfig` field, from its name and default:
    a seed, a decay in [0, 1], weights >= 0, and counts, steps and rates > 0."""
    if name == "seed":
        return argtypes.seed
    if isinstance(default, int):
        return argtypes.positive_int
    if name.endswith("decay"):
        return argtypes.probability
    if name.endswith("weight"):
        return argtypes.nonneg_float
    return argtypes.positive_float


def run_train(args: argparse.Namespace) -> int:
    from mixdq_jax.testbed import judge, train  # noqa: PLC0415

    cfg = train.TrainConfig(**{
        f.name: getattr(args, f.name) for f in dataclasses.fields(train.TrainConfig)
    })  # fmt: skip
    out = train.train(
        cfg, work_dir=args.work_dir, out=args.out or train.DEFAULT_OUT,
        judge_path=args.judge_out or judge.JUDGE_PATH, stages=tuple(args.stages),
        progress=not args.no_progress,
    )  # fmt: skip
    print(f"testbed written to {out}")
    return 0
