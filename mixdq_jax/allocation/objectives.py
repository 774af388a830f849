"""What the integer program maximises: per-layer scores derived from the measured sensitivities.

The program (`milp.BitProgram`) maximises a sum of per-layer scores, so every objective here is
a per-layer transform of the sweep's numbers, solved exactly by the same program:

- ``official``: the paper's and the official code's objective, the raw scores: SSIM for the
  content group, SQNR in dB for the quality group. Summing dB multiplies signal-to-noise
  ratios: lowering a layer from 60 to 45 dB costs the same 15 points as lowering another from
  25 to 10 dB, although the first adds about 3e-5 of the output's power as noise and the
  second about 0.1.
- ``noise``: minimise the summed quantization noise power the layers add to the UNet output,
  ``sum_i 10^(-SQNR_i / 10)`` (relative to the output's power), which is the output noise of
  the whole configuration if independent layer noises add in power (measured in BENCHMARKS.md:
  "Allocation objectives"). SSIM scores are already additive losses (``1 - SSIM``), so the
  content group's program is the official one up to a constant.

Scores are scaled by the group's total at the lowest candidate so that the solver's absolute
tolerances mean the same on every model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from mixdq_jax.allocation.milp import score_index

OBJECTIVES: tuple[str, ...] = ("official", "noise")

Scores = Mapping[str, Sequence[float]]


def check_objective(objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: expected one of {', '.join(OBJECTIVES)}")
    return objective


def noise_power(sqnr_db: float) -> float:
    """Quantization noise power relative to the signal's, from an SQNR in dB."""
    return 10.0 ** (-float(sqnr_db) / 10.0)


def program_scores(scores: Scores, metric: str, objective: str) -> dict[str, tuple[float, ...]]:
    """Per-layer scores (higher is better, one per measured bit-width) that the integer
    program sums under ``objective`` for sensitivities measured with ``metric``."""
    check_objective(objective)
    if metric not in ("sqnr", "ssim"):
        raise ValueError(f"metric {metric!r}: expected 'sqnr' or 'ssim'")
    if objective == "official":
        return {n: tuple(float(v) for v in s) for n, s in scores.items()}
    if metric == "sqnr":
        loss = {n: tuple(noise_power(v) for v in s) for n, s in scores.items()}
    else:
        loss = {n: tuple(1.0 - float(v) for v in s) for n, s in scores.items()}
    # the group's loss with every layer at its worst measured bit-width: a scale only
    total = math.fsum(max(v) for v in loss.values()) or 1.0
    return {n: tuple(-v / total for v in s) for n, s in loss.items()}


def predicted_noise(bits: Mapping[str, int], sqnr: Scores) -> float:
    """The output noise power (relative) that the additive model predicts for ``bits``:
    ``sum_i 10^(-SQNR_i(b_i) / 10)`` over the quantized layers (bits 2, 4 or 8)."""
    return math.fsum(
        noise_power(sqnr[n][score_index(b)]) for n, b in bits.items() if b in (2, 4, 8)
    )
