"""``mixdq generate``: images from prompts with a float (or quantized) pipeline."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from tqdm import tqdm

from mixdq_jax.cli.calibrate import native_size
from mixdq_jax.cli.quant_args import (
    add_dtype_arg,
    add_quant_args,
    describe,
    resolve_dtype,
    spec_from_args,
)
from mixdq_jax.io_utils import atomic_write_bytes, atomic_write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from text prompts")
    p.add_argument(
        "--model", default="testbed", help="diffusers folder, cached repo id, or testbed (default)"
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="text file, one prompt per line")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--height", type=int, default=None, help="default: the model's native size")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; +1 per image")
    p.add_argument("--scheduler", default=None, help="override, e.g. LCMScheduler")
    p.add_argument("--lora", type=Path, default=None, help="LoRA safetensors fused into the UNet")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--variant", default=None, help="weight variant, e.g. fp16")
    add_dtype_arg(p)
    p.add_argument("--allow-pickle", action="store_true", help="allow .bin (pickle) weights")
    p.add_argument("--out", type=Path, required=True, help="output folder for PNGs")
    add_quant_args(p)
    p.set_defaults(func=run)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file")
        prompts += [ln.strip() for ln in args.prompts_file.read_text().splitlines() if ln.strip()]
    if not prompts:
        raise ValueError("no prompt given: use --prompt TEXT or --prompts-file FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.api import load_pipeline, quantized_config  # noqa: PLC0415  (fast --help)

    prompts = read_prompts(args)
    spec = spec_from_args(args)
    pipe = load_pipeline(
        args.model,
        dtype=resolve_dtype(args.dtype),
        variant=args.variant,
        scheduler=args.scheduler,
        lora=args.lora,
        lora_scale=args.lora_scale,
        allow_pickle=args.allow_pickle,
    )
    qconfig = quantized_config(pipe, spec, args.calib)
    native_h, native_w = native_size(pipe)
    height, width = args.height or native_h, args.width or native_w
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "prompts.json"
    settings = {
        "model": str(args.model),
        "steps": args.steps,
        "guidance": args.guidance,
        "height": height,
        "width": width,
        "scheduler": args.scheduler,
        "negative_prompt": args.negative_prompt,
        "lora": str(args.lora),
        "lora_scale": args.lora_scale,
        "dtype": resolve_dtype(args.dtype),
        "quant": describe(spec),
        "weight_bits": args.weight_bits,
        "act_bits": args.act_bits,
        "calib": str(args.calib),
    }
    done = {}
    if index_path.is_file():  # resume: keep images made earlier with the same settings
        previous = json.loads(index_path.read_text())
        if previous.get("settings") == settings:
            done = {r["file"]: r for r in previous.get("images", [])}
    records = []
    for i, prompt in enumerate(tqdm(prompts, desc="images", unit="img")):
        name, seed = f"{i:04d}.png", args.seed + i
        record = {"file": name, "prompt": prompt, "seed": seed}
        if done.get(name) != record or not (args.out / name).is_file():
            (image,) = pipe(
                prompt,
                negative_prompt=args.negative_prompt,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=height,
                width=width,
                seed=seed,
                output_type="pil",
                qconfig=qconfig,
            )
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            atomic_write_bytes(args.out / name, buf.getvalue())
        records.append(record)
        atomic_write_json(index_path, {"settings": settings, "images": records})
    print(f"wrote {len(records)} image(s) to {args.out}")
    return 0
