"""``mixdq layers``: list a UNet's quantizable layers (name, kind, group, shapes, sizes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="list the quantizable layers of a UNet")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="diffusers folder, cached repo id, or testbed")
    src.add_argument(
        "--unet-config", type=Path, help="a UNet config.json: shapes only, no weights needed"
    )
    p.add_argument("--format", choices=["json", "table"], default="table")
    p.add_argument(
        "--latent-size",
        type=int,
        default=None,
        help="latent height=width for activation sizes (default: config sample_size)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415  (keeps --help fast)
    from mixdq_jax.quant.registry import registry_from_unet_config  # noqa: PLC0415

    if args.unet_config is not None:
        config_path = args.unet_config
    else:
        config_path = resolve_model(args.model) / "unet" / "config.json"
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"{config_path}: no UNet config.json there")
    size = args.latent_size
    layers = registry_from_unet_config(config_path, height=size, width=size)
    if args.format == "json":
        print(json.dumps([layer.as_dict() for layer in layers], indent=1))
        return 0
    header = f"{'layer':<72} {'kind':<6} {'group':<8} {'weight':>12} {'input':>10}"
    print(header)
    print("-" * len(header))
    for layer in layers:
        print(
            f"{layer.name:<72} {layer.kind:<6} {layer.group:<8} {layer.weight_params:>12,d} "
            f"{layer.input_size:>10,d}"
        )
    content = sum(layer.group == "content" for layer in layers)
    params = sum(layer.weight_params for layer in layers)
    print(
        f"{len(layers)} layers ({content} content, {len(layers) - content} quality), "
        f"{params:,d} weight parameters"
    )
    return 0
