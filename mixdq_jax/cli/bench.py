"""``mixdq bench``: measured memory and latency of the deployed (real low-bit) UNet."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixdq_jax.cli.argtypes import existing_file, float_in, positive_int
from mixdq_jax.cli.layers import read_unet_config
from mixdq_jax.cli.outputs import claim, output_file, read_json_quietly
from mixdq_jax.io_utils import atomic_write_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="memory and latency of FP vs W8A8 vs W4A8 UNets; per-layer cost tables"
    )
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

    lay = which.add_parser(
        "layers", help="per-layer cost table: latency, bytes and BOPs of each layer per format"
    )
    lay.add_argument(
        "--model", default="testbed", metavar="MODEL",
        help="a UNet config.json (shapes only: no weights needed), a diffusers folder, a "
        "Hugging Face repo id (configs only are downloaded) or testbed (default)",
    )  # fmt: skip
    lay.add_argument(
        "--formats", default="float,fp8,w8a8,w4a8,w4a16",
        help="comma list of per-layer formats (float,fp8,w8a8,w4a8,w4a16,w4a4lr); float is "
        "always measured",
    )  # fmt: skip
    lay.add_argument(
        "--out", type=Path, required=True,
        help="the cost table (JSON; rewritten after every layer, resumed when rerun with the "
        "same settings)",
    )  # fmt: skip
    lay.add_argument("--batch", type=positive_int, default=1, help="batch of the timed calls")
    lay.add_argument(
        "--latent", type=positive_int, default=None,
        help="latent side (default: the config's sample_size; 128 = 1024x1024 SDXL)",
    )  # fmt: skip
    lay.add_argument("--repeats", type=positive_int, default=5, help="timed calls per layer")
    lay.add_argument(
        "--lowrank-fraction", type=float_in(0.0, 1.0, "a fraction"), default=None,
        help="w4a4lr: each layer's branch holds this fraction of its weights (at most rank "
        "32; default: rank 32, capped to the matrix)",
    )  # fmt: skip
    lay.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"],
        help="float dtype (default: float32 on CPU, float16 on GPU)",
    )  # fmt: skip
    lay.add_argument(
        "--backend", default="auto", choices=["auto", "xla", "pallas"],
        help="kernel backend of the quantized layers (auto: Pallas on GPU, XLA elsewhere)",
    )  # fmt: skip
    lay.add_argument(
        "--check-additivity", action="store_true",
        help="also time the whole UNet in each uniform format and compare with the table's "
        "sums (written to the table as 'unet' and 'fit')",
    )  # fmt: skip
    lay.add_argument("--unet-repeats", type=positive_int, default=3,
                     help="timed whole-UNet forwards per format (--check-additivity)")  # fmt: skip
    lay.add_argument(
        "--overwrite", action="store_true",
        help="let --out replace a file that is no cost table, or one made with other settings",
    )  # fmt: skip
    lay.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar")  # fmt: skip
    lay.set_defaults(func=run_layers)


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


def _is_cost_table(path: Path) -> bool:
    data = read_json_quietly(path)
    return isinstance(data, dict) and str(data.get("schema", "")).startswith("mixdq-layer-costs/")


def _model_config(text: str):
    """``--model`` as a UNet config: a config.json file, or a model's ``unet/config.json``."""
    from mixdq_jax.hub import ModelName  # noqa: PLC0415
    from mixdq_jax.loader import resolve_model  # noqa: PLC0415

    path = Path(text).expanduser()
    if text != "testbed" and path.is_file():
        return read_unet_config(path, "--model")
    folder = resolve_model(ModelName(text, configs_only=True))
    config_path = Path(folder) / "unet" / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--model {text}: no UNet config at {config_path}")
    return read_unet_config(config_path, "--model")


def run_layers(args: argparse.Namespace) -> int:
    from mixdq_jax.deploy.layer_costs import (  # noqa: PLC0415
        check_additivity,
        cost_table,
        write_table,
    )
    from mixdq_jax.quant.layer_formats import parse_formats  # noqa: PLC0415

    formats = [f.name for f in parse_formats(args.formats)]
    config = _model_config(str(args.model))
    target = output_file("--out", args.out, own=_is_cost_table)
    with claim(args, target):
        settings = dict(
            formats=formats, batch=args.batch, latent=args.latent, float_dtype=args.dtype,
            backend=args.backend, rank_fraction=args.lowrank_fraction,
        )  # fmt: skip
        restart = args.overwrite and _cannot_resume(args.out, config, settings)
        table = cost_table(
            config, **settings, repeats=args.repeats, out=args.out, restart=restart,
            progress=args.progress,
        )  # fmt: skip
        if args.check_additivity:
            check_additivity(config, table, repeats=args.unet_repeats, progress=args.progress)
            write_table(args.out, table)
    print("\n".join(_layers_summary(table)))
    return 0


def _cannot_resume(path: Path, config, settings: dict) -> bool:
    """Whether ``--out`` holds something other than a table this run resumes (``--overwrite``
    then starts it afresh)."""
    from mixdq_jax.deploy.layer_costs import (  # noqa: PLC0415
        load_costs,
        settings_mismatch,
        table_settings,
    )

    if not path.exists():
        return False
    try:
        old = load_costs(path)["settings"]
    except ValueError:
        return True
    return settings_mismatch(old, table_settings(config, **settings)) is not None


def _layers_summary(table: dict) -> list[str]:
    s = table["settings"]
    lines = [
        f"{len(table['layers'])} layers, batch {s['batch']}, latent {s['latent']}, "
        f"{s['float_dtype']} on {table['device']} ({table['backend']}); "
        f"{'complete' if table['complete'] else 'incomplete: rerun to go on'}",
        f"{'format':8s} {'sum ms':>10s} {'vs float':>9s} {'bytes':>14s} {'GBOPs':>12s}",
    ]
    base = table["totals"].get("float", {}).get("ms") or 0.0
    for fmt, t in table["totals"].items():
        speed = f"{base / t['ms']:.2f}x" if t["ms"] else "-"
        extra = f"  ({t['float_fallback']} layers float)" if t["float_fallback"] else ""
        lines.append(
            f"{fmt:8s} {t['ms']:>10.3f} {speed:>9s} {_mb(t['bytes']):>14s} "
            f"{t['bops'] / 1e9:>12.3f}{extra}"
        )
    for fmt, u in table.get("unet", {}).items():
        lines.append(f"UNet {fmt}: measured {u['measured_ms']:.3f} ms, table sum "
                     f"{u['predicted_ms']:.3f} ms, ratio {u['ratio']}")  # fmt: skip
    if "fit" in table:
        f = table["fit"]
        lines.append(f"fit: measured ~= {f['a']} * sum + {f['b_ms']} ms (residual rms "
                     f"{f['residual_rms_ms']} ms)")  # fmt: skip
    return lines
