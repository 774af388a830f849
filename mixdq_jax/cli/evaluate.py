"""``mixdq evaluate``: testbed metrics of a float or fake-quantized model on a caption split."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mixdq_jax.cli.argtypes import MAX_SEED, positive_int, seed
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
    p.add_argument(
        "--model",
        default="testbed",
        help="testbed (default), a testbed-like folder, or a quantized folder of `mixdq export` "
        "/ `mixdq quantize` (then compared with the float model it was exported from)",
    )
    p.add_argument(
        "--float-model",
        default=None,
        help="the float model the 'vs float' metrics compare with (default: --model itself, or "
        "for a quantized folder the source recorded at export)",
    )
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--steps", type=positive_int, default=1, help="1: Euler-A trailing; more: LCM")
    p.add_argument("--num", type=positive_int, default=256, help="number of captions")
    p.add_argument("--seed", type=seed, default=0)
    add_dtype_arg(p)
    p.add_argument("--out", type=Path, default=None, help="write metrics.json and grid.png here")
    add_quant_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.api import load_pipeline, quantized_config  # noqa: PLC0415
    from mixdq_jax.io_utils import atomic_write_json  # noqa: PLC0415
    from mixdq_jax.testbed import evaluate  # noqa: PLC0415

    if args.seed + args.num - 1 > MAX_SEED:
        raise ValueError(
            f"--seed {args.seed}: image i uses seed+i, and --num {args.num} goes past {MAX_SEED}"
        )
    spec = spec_from_args(args)
    scheduler = None if args.steps == 1 else "LCMScheduler"
    dtype = resolve_dtype(args.dtype)
    pipe = load_pipeline(args.model, scheduler=scheduler, dtype=dtype)
    kw = dict(split=args.split, steps=args.steps, num=args.num, seed=args.seed)
    float_model = args.float_model
    if float_model is None and pipe.unet_mode is not None:
        float_model = _export_source(args.model)
    if float_model is not None:  # the model under test is not the float reference
        float_pipe = load_pipeline(float_model, scheduler=scheduler, dtype=dtype)
        reference = evaluate.evaluate(float_pipe, **kw)
        del float_pipe
    else:
        reference = evaluate.evaluate(pipe, **kw)
    if spec is None and float_model is None:
        result = reference
        metrics = dict(result.metrics, ssim_vs_fp=1.0, psnr_vs_fp=math.inf)
    elif spec is None:
        result = evaluate.evaluate(pipe, reference_images=reference.images, **kw)
        metrics = dict(result.metrics)
    else:
        qconfig = quantized_config(pipe, spec, args.calib)
        result = evaluate.evaluate(pipe, reference_images=reference.images, qconfig=qconfig, **kw)
        metrics = dict(result.metrics)
    metrics["model"] = str(args.model)
    metrics["float_model"] = None if float_model is None else str(float_model)
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


def _export_source(model: str) -> str:
    """The float folder a quantized folder was exported from (recorded in its metadata)."""
    from mixdq_jax.deploy.checkpoint import read_quant_meta  # noqa: PLC0415
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415

    unet = Path(resolve_model(model)) / "unet"
    source = read_quant_meta(unet).get("source")
    if not source or not (Path(source) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{model}: a quantized folder whose float source ({source or 'not recorded'}) is "
            "gone; pass --float-model PATH for the 'vs float' metrics"
        )
    return source
