"""Calibrate -> sweep -> allocate -> a fake-quantized function, in one call."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mixdq_jax.any_model.allocation import Budget, allocate
from mixdq_jax.any_model.calibration import calibrate, input_batches
from mixdq_jax.any_model.functions import ApplyFn, QuantizedApply, fake_quantized
from mixdq_jax.any_model.registry import model_layers
from mixdq_jax.any_model.sensitivity import Sensitivity, SweepConfig, sweep
from mixdq_jax.quant.qconfig import QConfig
from mixdq_jax.quant.registry import LayerInfo


@dataclass(frozen=True, kw_only=True)
class Quantized:
    """What :func:`quantize` chose and why: ``apply(params, qconfig, *inputs)`` is the
    fake-quantized model (jit it once; the configuration is data), ``qconfig`` the chosen
    bits and ranges, and the layers, calibrated ranges and sweep scores behind them."""

    apply: QuantizedApply
    qconfig: QConfig
    layers: tuple[LayerInfo, ...]
    ranges: Mapping[str, np.ndarray]
    sensitivity: Sensitivity


def quantize(
    apply: ApplyFn,
    params: Any,
    batches: Iterable[Sequence[Any]],
    *,
    budget: Budget = Budget(),  # noqa: B008 - frozen
    sweep_config: SweepConfig = SweepConfig(),  # noqa: B008 - frozen
    group: Callable[[str], str] | None = None,
    sweep_batches: Iterable[Sequence[Any]] | None = None,
) -> Quantized:
    """MixDQ on any Flax model given as ``apply(params, *inputs)``: find its Dense/Conv layers,
    calibrate their input ranges on ``batches`` (tuples of inputs), sweep each layer's
    sensitivity (on ``sweep_batches``, default ``batches``), allocate bits to ``budget``.

    ``group``: layer name -> ``"content"`` / ``"quality"`` for metric-decoupled allocation
    (with ``sweep_config.content_metric``); default: one group.
    """
    batches = input_batches(batches)
    swept = batches if sweep_batches is None else input_batches(sweep_batches)
    layers = model_layers(apply, params, *batches[0], group=group)
    ranges = calibrate(apply, params, batches, layers)
    sensitivity = sweep(apply, params, swept, layers, ranges, config=sweep_config)
    qconfig = allocate(sensitivity, layers, ranges, budget=budget)
    return Quantized(
        apply=fake_quantized(apply),
        qconfig=qconfig,
        layers=layers,
        ranges=ranges,
        sensitivity=sensitivity,
    )
