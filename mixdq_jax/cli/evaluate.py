"""``mixdq evaluate``: testbed metrics of a float or fake-quantized model on a caption split."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mixdq_jax.cli.quant_args import (
    add_dtype_arg,
    add_quant_args,
    describe,
    resolve_dtype,
    spec_from_args,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="content score, Frechet distance, SSIM/PSNR vs float on testbed captions",
        description="Generates images for held-out testbed captions (image i uses seed "
        "seed+i), scores them with the testbed's judge, and compares them with the float "
        "model's images on the same captions and seeds.",
    )
    p.add_argument("--model", default="testbed", help="testbed (default) or a testbed-like folder")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--steps", type=int, default=1, help="1: Euler-A trailing; more: LCM")
    p.add_argument("--num", type=int, default=256, help="number of captions")
    p.add_argument("--seed", type=int, default=0)
    add_dtype_arg(p)
    p.add_argument("--out", type=Path, default=None, help="write metrics.json and grid.png here")
    add_quant_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.api import load_pipeline, quantized_config  # noqa: PLC0415
    from mixdq_jax.io_utils import atomic_write_json  # noqa: PLC0415
    from mixdq_jax.testbed import evaluate  # noqa: PLC0415

    spec = spec_from_args(args)
    scheduler = None if args.steps == 1 else "LCMScheduler"
    pipe = load_pipeline(args.model, scheduler=scheduler, dtype=resolve_dtype(args.dtype))
    kw = dict(split=args.split, steps=args.steps, num=args.num, seed=args.seed)
    reference = evaluate.evaluate(pipe, **kw)
    if spec is None:
        result = reference
        metrics = dict(result.metrics, ssim_vs_fp=1.0, psnr_vs_fp=math.inf)
    else:
        qconfig = quantized_config(pipe, spec, args.calib)
        result = evaluate.evaluate(pipe, reference_images=reference.images, qconfig=qconfig, **kw)
        metrics = dict(result.metrics)
    metrics["model"] = str(args.model)
    metrics["quantization"] = describe(spec)
    metrics["weight_bits"] = args.weight_bits
    metrics["act_bits"] = args.act_bits
    shown = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in metrics.items()}
    print(json.dumps(shown, indent=2))
    if args.out is not None:
        atomic_write_json(args.out / "metrics.json", shown)
        evaluate.save_grid(args.out / "grid.png", result.images[:64], result.scenes.captions[:64])
        print(f"wrote {args.out / 'metrics.json'} and {args.out / 'grid.png'}")
    return 0
