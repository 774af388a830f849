"""``mixdq layers``: list a UNet's quantizable layers (name, kind, group, shapes, sizes)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from mixdq_jax.cli.argtypes import positive_int
from mixdq_jax.cli.model_args import MODEL_HELP, add_model_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="list the quantizable layers of a UNet")
    src = p.add_mutually_exclusive_group(required=True)
    add_model_args(
        p, group=src, default=None, help_text=MODEL_HELP, variant=False, configs_only=True
    )
    src.add_argument(
        "--unet-config", type=Path, help="a UNet config.json: shapes only, no weights needed"
    )
    p.add_argument("--format", choices=["json", "table"], default="table")
    p.add_argument(
        "--latent-size",
        type=positive_int,
        default=None,
        help="latent height=width for activation sizes (default: config sample_size)",
    )
    p.set_defaults(func=run)


def read_unet_config(path: Path, flag: str | None = None) -> Any:
    """A diffusers UNet ``config.json`` as a ``UNetConfig``; a file that is not one (not JSON,
    not an object, unknown keys or values) is a ``ValueError`` naming it, not a crash later."""
    from mixdq_jax.io_utils import read_json_object  # noqa: PLC0415
    from mixdq_jax.models.unet import UNetConfig  # noqa: PLC0415

    if not Path(path).is_file():
        where = f"{flag} {path}" if flag else str(path)
        raise FileNotFoundError(f"{where}: no such file (a diffusers unet/config.json)")
    data = read_json_object(path, flag, what="a diffusers UNet config.json")
    try:
        return UNetConfig.from_dict(data)
    except (ValueError, KeyError, TypeError) as err:
        where = f"{flag} {path}" if flag else str(path)
        raise ValueError(f"{where}: not a UNet config this package reads ({err})") from None


def run(args: argparse.Namespace) -> int:
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415  (keeps --help fast)
    from mixdq_jax.quant.registry import build_registry  # noqa: PLC0415

    if args.unet_config is not None:
        config = read_unet_config(args.unet_config, "--unet-config")
    else:
        config_path = resolve_model(args.model) / "unet" / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path}: no UNet config.json there")
        config = read_unet_config(config_path)
    size = args.latent_size
    layers = build_registry(config, height=size, width=size)
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
