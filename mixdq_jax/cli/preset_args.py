"""``--preset`` and the allocation options it sets defaults for, shared by ``mixdq quantize``,
``mixdq demo`` and ``mixdq allocate``: one set of defaults (`mixdq_jax.recipe.PRESETS`)."""

from __future__ import annotations

import argparse

from mixdq_jax.cli import argtypes

PRESET_NAMES = ("ours", "paper", "official")
_act_average = argtypes.float_in(2.0, 8.0, "the activation average (A8: {4, 8}, A4: {2, 4, 8})")
_percent = argtypes.float_in(0.0, 100.0, "a percentage")

PRESET_HELP = (
    "where the settings come from (docs/departures.md, point by point): ours (default: the "
    "paper's quantizer with the least-noise-power objective, measured to predict the image "
    "better), paper (what the MixDQ paper states: asymmetric min-max, its summed SSIM/SQNR "
    "objective; ours where it is silent), official (what the released code does: symmetric "
    "weights, EMA ranges observed with 8-bit activations on the W8 model, SQNR as a ratio of "
    "sums, its budget split, A8 as act_8.00, its uint8 pick on one prompt)"
)


def add_preset_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--preset", choices=PRESET_NAMES, default="ours", help=PRESET_HELP)


def add_allocation_args(g: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--objective``, ``--act-average``, ``--protect-top``: ``None`` keeps the preset's."""
    g.add_argument(
        "--objective", choices=("official", "noise"), default=None,
        help="what the integer program maximises: noise (least summed quantization noise "
        "power; --preset ours) or official (summed SSIM / SQNR dB as the paper and the "
        "released code; --preset paper and official)",
    )  # fmt: skip
    g.add_argument(
        "--act-average", type=_act_average, default=None,
        help="A8: average bits of the non-protected activation layers (ours and paper: 7.7, "
        "lowered if needed so the effective average, float layers at 16, is <= 8; official: "
        "8, the released act_8.00; the released act_7.77 is --act-average 7.77); A4: of the "
        "{2, 4, 8} mix over the quantized layers (4)",
    )  # fmt: skip
    g.add_argument(
        "--protect-top", type=_percent, default=None,
        help="A8: percent of activation layers per group kept float, the lowest-scoring at "
        "8 bits (1, the paper's)",
    )  # fmt: skip


def allocation_options(args: argparse.Namespace):
    """The `AllocationOptions` of ``--preset`` with the options the user gave."""
    from mixdq_jax.recipe import PRESETS  # noqa: PLC0415  (keeps --help fast)

    return PRESETS[args.preset].knobs(
        objective=args.objective, act_average=args.act_average, protect_top=args.protect_top
    )
