"""Shared ``--weight-bits/--act-bits/...`` options: a command-line quantization spec."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mixdq_jax.cli.argtypes import bits_or_file, existing_dir
from mixdq_jax.quant.qconfig import FLOAT_BITS, QUANT_BITS, QuantSpec

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_dtype_arg(p: argparse.ArgumentParser) -> None:
    """``--dtype``: the dtype the model's weights are loaded and run in."""
    p.add_argument(
        "--dtype", default="auto", choices=DTYPES,
        help="dtype the model is loaded and run in; auto (default): float16 on a GPU, float32 "
        "on CPU, where XLA computes float16 in float32 (measured in BENCHMARKS.md)",
    )  # fmt: skip


def resolve_dtype(value: str) -> str:
    """``--dtype auto`` as the concrete dtype for this machine's default JAX backend."""
    if value != "auto":
        return value
    import jax  # noqa: PLC0415  (only when a command runs: keeps --help fast)

    return "float16" if jax.default_backend() == "gpu" else "float32"


def add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization (fake quant of the UNet; default: float)")
    g.add_argument(
        "--weight-bits",
        type=bits_or_file,
        default=None,
        help="N (all layers) or an official-format YAML {model.<layer>: bits}",
    )
    g.add_argument(
        "--act-bits",
        type=bits_or_file,
        default=None,
        help="N or an official-format YAML; layers absent from the file stay float "
        "(the official protected layers)",
    )
    g.add_argument(
        "--format",
        dest="quant_format",
        choices=["int", "fp8"],
        default="int",
        help="fp8: FP8 e4m3 fake quant (the paper's non-uniform baseline)",
    )
    g.add_argument(
        "--symmetric-weights",
        action="store_true",
        help="symmetric per-channel weights (the official run config)",
    )
    g.add_argument(
        "--no-bos-aware",
        dest="bos_aware",
        action="store_false",
        help="quantize the BOS token's to_k/to_v rows too",
    )
    g.add_argument(
        "--no-shortcut-split",
        dest="shortcut_split",
        action="store_false",
        help="one range for the up-block conv_shortcut concatenated input",
    )
    g.add_argument(
        "--calib",
        type=existing_dir,
        default=None,
        help="calibration run directory (needed for quantized activations)",
    )


def _bits(value: str | None, what: str) -> tuple[int | dict[str, int], bool]:
    """(bits, from_file)."""
    if value is None:
        return FLOAT_BITS, False
    if value.isdigit():
        bits = int(value)
        if bits not in (*QUANT_BITS, FLOAT_BITS):
            raise ValueError(f"--{what} {bits}: supported bit-widths are 2..8 or 16 (float)")
        return bits, False
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"--{what} {value}: neither a bit-width nor an existing file")
    from mixdq_jax.official_format import read_bits  # noqa: PLC0415

    return read_bits(path, allowed=QUANT_BITS), True


def spec_from_args(args: argparse.Namespace) -> QuantSpec | None:
    """The spec the options describe, or ``None`` for the float model. Quantized activations
    without ``--calib`` fail here, naming the option, before any model loads (later, the
    missing ranges would be a list of every layer's name)."""
    w, _ = _bits(args.weight_bits, "weight-bits")
    a, a_file = _bits(args.act_bits, "act-bits")
    if w == FLOAT_BITS and a == FLOAT_BITS and args.quant_format == "int":
        return None
    quantized_acts = any(b < FLOAT_BITS for b in a.values()) if isinstance(a, dict) else (
        a < FLOAT_BITS)  # fmt: skip
    if quantized_acts and args.calib is None:
        raise ValueError(
            f"--act-bits {args.act_bits} quantizes activations, which needs their calibrated "
            "ranges: add --calib RUN, a run directory of `mixdq calibrate --run RUN` on the "
            "same model"
        )
    return QuantSpec(
        weight_bits=w,
        act_bits=a,
        default_act_bits=FLOAT_BITS if a_file else None,
        fp8=args.quant_format == "fp8",
        symmetric_weights=args.symmetric_weights,
        bos_aware=args.bos_aware,
        shortcut_split=args.shortcut_split,
    )


def check_bits_files(args: argparse.Namespace, spec: QuantSpec | None, pipe: Any) -> None:
    """Bit-width files (``--weight-bits``/``--act-bits FILE``) checked against the loaded
    model's UNet layers: an unknown layer (a file edited by hand, or written for another
    model) or a weight layer the file leaves out is named with the file, not as the spec's
    internal field."""
    if spec is None or not hasattr(getattr(pipe, "unet", None), "config"):
        return
    if getattr(pipe, "quantized", None) is not None:  # an export: quantized_config refuses it
        return
    from mixdq_jax.quant.registry import unet_layers  # noqa: PLC0415

    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    model = getattr(args, "model", None)
    listing = f"`mixdq layers --model {model}` lists them" if model else "`mixdq layers` lists them"
    for flag, value, bits in (("--weight-bits", args.weight_bits, spec.weight_bits),
                              ("--act-bits", args.act_bits, spec.act_bits)):  # fmt: skip
        if not isinstance(bits, Mapping):
            continue
        unknown = sorted(set(bits) - set(names))
        if unknown:
            raise ValueError(
                f"{flag} {value}: {len(unknown)} layer(s) not in this model's UNet: "
                f"{_some(unknown)} (a file for another model, or a misspelt name?); {listing}"
            )
        missing = [n for n in names if n not in bits]
        if flag == "--weight-bits" and missing and spec.default_weight_bits is None:
            raise ValueError(
                f"{flag} {value}: no bit-width for {len(missing)} layer(s) of this model's "
                f"UNet: {_some(missing)}; a weight file lists every layer (use 16 for float); "
                f"{listing}"
            )


def _some(names: list[str], limit: int = 5) -> str:
    more = len(names) - limit
    return ", ".join(repr(n) for n in names[:limit]) + (f" (and {more} more)" if more > 0 else "")


def describe(spec: QuantSpec | None) -> str:
    if spec is None:
        return "float"
    fmt = "fp8" if spec.fp8 else "int"
    w = spec.weight_bits if isinstance(spec.weight_bits, int) else "mixed"
    a = spec.act_bits if isinstance(spec.act_bits, int) else "mixed"
    bos = "" if spec.bos_aware else ", no BOS-aware"
    return f"W{w}A{a} {fmt}{bos}"
