"""Calibration of any Flax model: every layer's input range over the user's batches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from mixdq_jax.any_model.functions import ApplyFn
from mixdq_jax.any_model.registry import float_qconfig
from mixdq_jax.quant.intercept import intercept
from mixdq_jax.quant.modes import Observe, update_ranges
from mixdq_jax.quant.registry import LayerInfo


def input_batches(batches: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """The batches as tuples of model inputs (a bare array would be unpacked along its first
    axis by ``apply(params, *batch)``, silently)."""
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, tuple | list):
            raise TypeError(
                f"batch {i} is a {type(batch).__name__}: each batch is a tuple of the model's "
                "inputs, e.g. (x,)"
            )
        out.append(tuple(batch))
    if not out:
        raise ValueError("no input batches")
    return out


def calibrate(
    apply: ApplyFn,
    params: Any,
    batches: Iterable[Sequence[Any]],
    layers: Sequence[LayerInfo],
) -> dict[str, np.ndarray]:
    """``{layer: [[lo, hi]]}``: the min and max of each layer's input over all ``batches``
    (each a tuple of inputs), widened to contain 0, in the ``[parts, 2]`` form the
    ``QConfig`` takes. The model runs in float; one compile serves every batch of one shape.
    """
    qconfig = float_qconfig(layers)

    @jax.jit
    def observe(params: Any, qconfig: Any, *inputs: Any) -> dict[str, jax.Array]:
        with intercept(Observe(), qconfig) as records:
            apply(params, *inputs)
        return records.data

    running = None
    for batch in input_batches(batches):
        running = update_ranges(running, observe(params, qconfig, *batch))
    return {name: np.asarray(r, np.float32) for name, r in running.items()}
