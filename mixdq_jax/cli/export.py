"""``mixdq export``: freeze a quantization config into a quantized pipeline folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixdq_jax.cli.argtypes import existing_file, finite_float
from mixdq_jax.cli.model_args import MODEL_HELP, add_model_args
from mixdq_jax.cli.outputs import claim, output_folder
from mixdq_jax.cli.quant_args import (
    add_dtype_arg,
    add_quant_args,
    check_bits_files,
    describe,
    resolve_dtype,
    spec_from_args,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a quantized pipeline (packed low-bit UNet weights + scales)"
    )
    add_model_args(p, help_text=f"the float model: {MODEL_HELP}; default: testbed", variant=False)
    p.add_argument("--out", type=Path, required=True, help="output pipeline folder")
    add_dtype_arg(p)
    p.add_argument(
        "--float-dtype",
        default="float16",
        choices=["float32", "bfloat16", "float16"],
        help="storage dtype of the UNet params that stay float (norms, biases, ...)",
    )
    p.add_argument("--variant", default=None, help="weight variant of the source, e.g. fp16")
    p.add_argument("--lora", type=existing_file, default=None, help="LoRA fused before quantizing")
    p.add_argument("--lora-scale", type=finite_float, default=1.0)
    p.add_argument(
        "--link-components",
        action="store_true",
        help="symlink the text encoders / VAE / tokenizers instead of copying them",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder that is not an earlier export, replacing the files "
        "the export writes (files it does not write are kept, never deleted)",
    )
    add_quant_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.api import load_pipeline  # noqa: PLC0415
    from mixdq_jax.deploy import export_quantized_pipeline  # noqa: PLC0415
    from mixdq_jax.deploy.checkpoint import check_export_folder  # noqa: PLC0415
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415

    if args.weight_bits is None and args.act_bits is None:
        raise ValueError("nothing to quantize: give --weight-bits and/or --act-bits")
    if args.quant_format != "int":
        raise ValueError("--format fp8 is a fake-quant baseline; export supports int formats")
    spec = spec_from_args(args)
    if spec is None:
        raise ValueError("the given bits keep every layer float: nothing to export")
    source = resolve_model(args.model)
    # the folder's contents follow the export's own rules (check_export_folder)
    with claim(args, output_folder("--out", args.out, own=None)):
        # the folder is checked before the model loads, and again (cheap) before writing
        check_export_folder(
            source, args.out, link_components=args.link_components, overwrite=args.overwrite
        )
        pipe = load_pipeline(
            source,
            dtype=resolve_dtype(args.dtype),
            variant=args.variant,
            lora=args.lora,
            lora_scale=args.lora_scale,
        )
        check_bits_files(args, spec, pipe)
        meta = export_quantized_pipeline(
            pipe,
            spec,
            args.out,
            calib=args.calib,
            float_dtype=args.float_dtype,
            link_components=args.link_components,
            overwrite=args.overwrite,
        )
    storage = {}
    for lp in meta["plan"].values():
        key = "float" if lp["storage_bits"] >= 16 else f"int{lp['storage_bits']}"
        storage[key] = storage.get(key, 0) + 1
    print(
        f"exported {describe(spec)} to {args.out}: UNet weights file "
        f"{meta['weights_bytes'] / 2**20:.1f} MiB, {len(meta['plan'])} quantized layers "
        f"({', '.join(f'{v} {k}' for k, v in sorted(storage.items()))})"
    )
    return 0
