"""``mixdq calibrate``: record activation ranges and float references into a run directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixdq_jax.cli import argtypes
from mixdq_jax.cli.argtypes import MAX_SEED, existing_file, nonneg_float, positive_int, seed
from mixdq_jax.cli.model_args import add_model_args
from mixdq_jax.cli.outputs import claim, run_directory
from mixdq_jax.cli.quant_args import add_dtype_arg, resolve_dtype
from mixdq_jax.io_utils import read_text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="calibrate activation ranges on prompts")
    add_model_args(p)
    p.add_argument(
        "--run", type=Path, required=True,
        help="run directory (resumable): new, empty or an earlier run's; not inside --model",
    )  # fmt: skip
    p.add_argument(
        "--prompts-file",
        type=existing_file,
        default=None,
        help="one prompt per line (default: the shipped list; testbed: its captions)",
    )
    p.add_argument("--num-prompts", type=positive_int, default=32)
    p.add_argument("--steps", type=positive_int, default=1)
    p.add_argument("--guidance", type=nonneg_float, default=0.0)
    p.add_argument("--height", type=positive_int, default=None)
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--method",
        choices=["minmax", "ema"],
        default="minmax",
        help="range accumulation over batches (ema: the official running_stat)",
    )
    p.add_argument("--scheduler", type=argtypes.scheduler_name, default=None)
    add_dtype_arg(p)
    p.add_argument(
        "--overwrite", action="store_true",
        help="write into a non-empty --run that is not a mixdq run directory (files it does not "
        "write are kept)",
    )  # fmt: skip
    p.set_defaults(func=run)


def calib_prompts(model: str, prompts_file: Path | None, n: int) -> list[str]:
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {prompts_file}: no such file")
        text = read_text(prompts_file, "--prompts-file")
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if len(prompts) < n:
            raise ValueError(f"--prompts-file {prompts_file}: {len(prompts)} prompts, need "
                             f"--num-prompts {n}; lower it or add prompts")  # fmt: skip
        return prompts[:n]
    if model == "testbed":
        from mixdq_jax.testbed import calibration_captions  # noqa: PLC0415

        return calibration_captions(n)
    from mixdq_jax.calibrate import default_prompts  # noqa: PLC0415

    return default_prompts(n)


def native_size(pipe) -> tuple[int, int]:
    return pipe.image_size


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.api import load_pipeline  # noqa: PLC0415
    from mixdq_jax.calibrate import CalibConfig, calibrate, encode_batches  # noqa: PLC0415

    prompts = tuple(calib_prompts(args.model, args.prompts_file, args.num_prompts))
    batches = -(-len(prompts) // args.batch_size)
    if args.seed + batches - 1 > MAX_SEED:
        raise ValueError(f"--seed {args.seed}: batch i uses seed+i, and {batches} batches go "
                         f"past {MAX_SEED}; use a smaller --seed")  # fmt: skip
    with claim(args, run_directory("--run", args.run)):  # before loading: fails at once
        pipe = load_pipeline(args.model, scheduler=args.scheduler, dtype=resolve_dtype(args.dtype))
        h, w = native_size(pipe)
        config = CalibConfig(
            prompts=prompts,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height or h,
            width=args.width or w,
            seed=args.seed,
            batch_size=args.batch_size,
            method=args.method,
        )
        embeddings = encode_batches(pipe, config, args.run)
        pipe = pipe.without_text_encoders()  # every prompt is encoded: free them for the UNet
        ranges = calibrate(pipe, config, args.run, embeddings=embeddings)
    print(f"calibrated {len(ranges)} layers on {len(config.prompts)} prompts -> {args.run}/calib")
    return 0
