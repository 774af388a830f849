"""``mixdq bench``: measured memory and latency of the deployed (real low-bit) UNet."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixdq_jax.cli.argtypes import existing_file, positive_int
from mixdq_jax.cli.layers import read_unet_config
from mixdq_jax.cli.outputs import claim, output_file, read_json_quietly
from mixdq_jax.io_utils import atomic_write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="memory and latency of FP vs W8A8 vs W4A8 UNets")
    which = p.add_subparsers(dest="bench", required=True)

    m = which.add_parser("memory", help="stored param bytes and compiled peak of one forward")
    m.add_argument(
        "--unet-config", type=existing_file, required=True, help="diffusers unet config.json"
    )
    m.add_argument(
        "--weight-bits",
        type=existing_file,
        default=None,
        help="official-format per-layer weight bits (adds the 'mixed' entry, activations 8 bit)",
    )
    m.add_argument(
        "--latent", type=positive_int, default=64, help="latent side (64 = 512x512 SDXL)"
    )
    m.add_argument(
        "--asymmetric-weights",
        action="store_true",
        help="asymmetric weights (adds a per-channel zero point)",
    )
    m.add_argument(
        "--no-peak",
        dest="peak",
        action="store_false",
        help="skip compiling the forward (param bytes only)",
    )
    m.add_argument("--json", action="store_true", help="print JSON (default: a table)")
    _add_out(m)
    m.set_defaults(func=run_memory)

    k = which.add_parser("kernels", help="SDXL GEMM/conv shapes and a whole UNet forward")
    k.add_argument("--repeats", type=positive_int, default=10, help="timed calls per kernel")
    k.add_argument(
        "--interpret",
        action="store_true",
        help="on CPU, also time Pallas kernels in interpret mode (slow)",
    )
    k.add_argument("--no-unet", dest="unet", action="store_false", help="skip the UNet forward")
    k.add_argument(
        "--unet-config",
        type=existing_file,
        default=None,
        help="UNet config.json for the forward (default: a reduced SDXL-shaped UNet)",
    )
    k.add_argument("--latent", type=positive_int, default=32, help="latent side of the forward")
    k.add_argument("--unet-repeats", type=positive_int, default=3, help="timed UNet forwards")
    k.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="float dtype of the FP run (default: float32 on CPU, float16 on GPU)",
    )
    k.add_argument("--json", action="store_true", help="print JSON (default: a summary)")
    _add_out(k)
    k.set_defaults(func=run_kernels)


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", type=Path, default=None,
        help="also write the JSON here (a new file or an earlier bench result)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true", help="let --out replace a file that is no bench result"
    )


def _is_bench(path: Path) -> bool:
    """An earlier ``mixdq bench --out`` JSON (memory or kernels)."""
    data = read_json_quietly(path)
    return isinstance(data, dict) and ("peak_note" in data or "kernels" in data)


def _claimed(args: argparse.Namespace):
    """``--out`` checked and locked before the measurement (`outputs.claim`)."""
    from contextlib import nullcontext  # noqa: PLC0415

    if args.out is None:
        return nullcontext()
    return claim(args, output_file("--out", args.out, own=_is_bench))


def _emit(result: dict, args: argparse.Namespace, summary: list[str]) -> None:
    if args.out is not None:
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2) if args.json else "\n".join(summary))


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def run_memory(args: argparse.Namespace) -> int:
    from mixdq_jax.deploy.memory import memory_table  # noqa: PLC0415

    config = read_unet_config(args.unet_config, "--unet-config")
    with _claimed(args):
        result = memory_table(
            config,
            weight_bits=args.weight_bits,
            latent=args.latent,
            symmetric_weights=not args.asymmetric_weights,
            peak=args.peak,
        )
        return _memory_summary(result, args)


def _memory_summary(result: dict, args: argparse.Namespace) -> int:
    lines = [f"{'config':8s} {'params':>14s} {'ratio':>7s} {'peak':>14s}"]
    for name, e in result["configs"].items():
        lines.append(
            f"{name:8s} {_mb(e['param_bytes']):>14s} {e['ratio_vs_float']:>6.2f}x "
            f"{_mb(e.get('peak_bytes')):>14s}"
        )
    lines.append(result["peak_note"])
    _emit(result, args, lines)
    return 0


def run_kernels(args: argparse.Namespace) -> int:
    from mixdq_jax.deploy.latency import run_kernel_bench, unet_latency  # noqa: PLC0415

    config = None
    if args.unet and args.unet_config is not None:
        config = read_unet_config(args.unet_config, "--unet-config")
    with _claimed(args):
        result = {
            "kernels": run_kernel_bench(repeats=args.repeats, include_interpret=args.interpret)
        }
        if args.unet:
            result["unet"] = unet_latency(
                config, latent=args.latent, float_dtype=args.dtype, repeats=args.unet_repeats
            )
        return _kernels_summary(result, args)


def _kernels_summary(result: dict, args: argparse.Namespace) -> int:
    lines = []
    for shape, e in result["kernels"]["gemm"].items():
        lines.append(f"{shape}: " + ", ".join(f"{k} {v} ms" for k, v in e["ms"].items()))
    for shape, e in result["kernels"]["conv"].items():
        lines.append(f"{shape}: " + ", ".join(f"{k} {v} ms" for k, v in e["ms"].items()))
    if "unet" in result:
        u = result["unet"]
        lines.append(
            f"UNet forward ({u['backend']}, latent {u['latent']}): "
            + ", ".join(f"{k} {v} ms" for k, v in u["ms"].items())
        )
    _emit(result, args, lines)
    return 0
