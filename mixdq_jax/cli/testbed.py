"""``mixdq testbed``: train the built-in testbed model, or score it with its judge."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from mixdq_jax.testbed.train import STAGES, TrainConfig  # noqa: PLC0415

    p = sub.add_parser("testbed", help="train or score the built-in testbed model")
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
            type=type(f.default),
            default=f.default,
            help=f"(default: {f.default})",
        )
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_train)

    s = tsub.add_parser("score", help="content score and Frechet distance of the testbed")
    s.add_argument("--model", type=Path, default=None, help="default: the shipped testbed")
    s.add_argument("--split", choices=["train", "val", "test"], default="test")
    s.add_argument("--steps", type=int, default=1, help="1: Euler-A trailing; more: LCM")
    s.add_argument("--num", type=int, default=256, help="number of captions")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=None, help="write metrics.json and a grid here")
    s.set_defaults(func=run_score)


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


def run_score(args: argparse.Namespace) -> int:
    from mixdq_jax.io_utils import atomic_write_json  # noqa: PLC0415
    from mixdq_jax.pipeline import load_pipeline  # noqa: PLC0415
    from mixdq_jax.testbed import evaluate  # noqa: PLC0415

    folder = args.model or evaluate.testbed_path()
    pipe = load_pipeline(folder, scheduler=None if args.steps == 1 else "LCMScheduler")
    result = evaluate.evaluate(pipe, split=args.split, steps=args.steps, num=args.num,
                               seed=args.seed)  # fmt: skip
    print(json.dumps(result.metrics, indent=2))
    if args.out is not None:
        atomic_write_json(args.out / "metrics.json", result.metrics)
        evaluate.save_grid(args.out / "grid.png", result.images[:64], result.scenes.captions[:64])
    return 0
