"""Shared ``--weight-bits/--act-bits/...`` options: a command-line quantization spec."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    """The spec the options describe, or ``None`` for the float model."""
    w, _ = _bits(args.weight_bits, "weight-bits")
    a, a_file = _bits(args.act_bits, "act-bits")
    if w == FLOAT_BITS and a == FLOAT_BITS and args.quant_format == "int":
        return None
    return QuantSpec(
        weight_bits=w,
        act_bits=a,
        default_act_bits=FLOAT_BITS if a_file else None,
        fp8=args.quant_format == "fp8",
        symmetric_weights=args.symmetric_weights,
        bos_aware=args.bos_aware,
        shortcut_split=args.shortcut_split,
    )


def describe(spec: QuantSpec | None) -> str:
    if spec is None:
        return "float"
    fmt = "fp8" if spec.fp8 else "int"
    w = spec.weight_bits if isinstance(spec.weight_bits, int) else "mixed"
    a = spec.act_bits if isinstance(spec.act_bits, int) else "mixed"
    bos = "" if spec.bos_aware else ", no BOS-aware"
    return f"W{w}A{a} {fmt}{bos}"
