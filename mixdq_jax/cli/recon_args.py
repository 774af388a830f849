"""The ``--recon-*`` options of learned rounding, shared by ``mixdq quantize`` and ``mixdq demo``
(the reconstruction rows: `mixdq_jax.methods.RECONSTRUCTION_METHODS`)."""

from __future__ import annotations

import argparse
from typing import Any

from mixdq_jax.cli import argtypes


def add_recon_args(p: argparse.ArgumentParser | Any) -> None:
    """BRECQ's settings as defaults; the testbed's documented runs pass fewer steps."""
    p.add_argument(
        "--recon-iters", type=argtypes.nonneg_int, default=20000,
        help="learned rounding: weight steps per block (20000, BRECQ's)",
    )  # fmt: skip
    p.add_argument(
        "--recon-act-iters", type=argtypes.nonneg_int, default=5000,
        help="learned rounding: activation step-size steps per block (5000)",
    )  # fmt: skip
    p.add_argument(
        "--recon-lr", type=argtypes.positive_float, default=1e-3,
        help="learned rounding: Adam step on the rounding variables (1e-3, BRECQ's; raise it "
        "with fewer --recon-iters)",
    )  # fmt: skip
    p.add_argument(
        "--recon-act-lr", type=argtypes.positive_float, default=4e-4,
        help="learned rounding: Adam step on the activation step sizes, cosine-decayed to 0 "
        "(4e-4, BRECQ's and Q-Diffusion's --lr)",
    )  # fmt: skip
    p.add_argument(
        "--recon-p", type=argtypes.float_in(1.0, 10.0, "the Lp exponent"), default=2.4,
        help="learned rounding: exponent p of the activation-step loss |d|^p (2.4, BRECQ's "
        "and Q-Diffusion's --p; the weight steps use 2, as theirs do)",
    )  # fmt: skip
    p.add_argument(
        "--recon-batch", type=argtypes.positive_int, default=32,
        help="learned rounding: calibration samples per step (32)",
    )  # fmt: skip
    p.add_argument(
        "--recon-blocks", nargs="+", default=(), metavar="MODULE",
        help="learned rounding: only these blocks or layers (module names, e.g. "
        "down_blocks.1.attentions.0.transformer_blocks.0); default every one",
    )  # fmt: skip


def recon_config(args: argparse.Namespace) -> Any:
    """The `ReconConfig` of the parsed ``--recon-*`` options (seed: ``--seed``)."""
    from mixdq_jax.reconstruction import ReconConfig  # noqa: PLC0415

    return ReconConfig(
        iters=args.recon_iters, act_iters=args.recon_act_iters, batch_size=args.recon_batch,
        lr=args.recon_lr, act_lr=args.recon_act_lr, p=args.recon_p, seed=args.seed,
        blocks=tuple(args.recon_blocks),
    )  # fmt: skip
