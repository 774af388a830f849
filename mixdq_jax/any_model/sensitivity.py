"""The layer-sensitivity sweep of any Flax model: each layer alone at each candidate bit-width,
weights and activations, scored against the float output.

Bits are data, so the sweep is ONE jitted program: a chunk of stacked single-layer
configurations goes through ``jax.vmap``, the float reference is computed in the same program,
and every chunk and batch of the same shape reuses it (``Sensitivity.compiles`` says how many
programs were compiled; 1 when the batches share a shape).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.any_model.calibration import input_batches
from mixdq_jax.any_model.functions import ApplyFn, fake_quantized
from mixdq_jax.any_model.registry import float_qconfig
from mixdq_jax.compile_events import first_call
from mixdq_jax.official_format import SENSITIVITY_BITS
from mixdq_jax.quant.qconfig import FLOAT_BITS, QConfig, mark_active_weights
from mixdq_jax.quant.registry import LayerInfo
from mixdq_jax.sensitivity.config import KINDS, SQNR_CAP_DB

Array = jax.Array

Metric = Callable[[Any, Any], Array]
"""``metric(float_output, quantized_output) -> scalar``, higher is better; traced under
``jax.vmap`` (jnp only)."""

_SWEPT = ("w_bits", "a_bits")  # the QConfig leaves batched over configurations


def sqnr(reference: Any, output: Any) -> Array:
    """SQNR in dB of ``output`` against ``reference`` over every element of every leaf,
    capped at ``SQNR_CAP_DB`` (an exactly zero error)."""
    ref = sum(jnp.sum(jnp.square(r.astype(jnp.float32))) for r in jax.tree.leaves(reference))
    err = sum(
        jnp.sum(jnp.square(o.astype(jnp.float32) - r.astype(jnp.float32)))
        for r, o in zip(jax.tree.leaves(reference), jax.tree.leaves(output), strict=True)
    )
    err = jnp.maximum(err, ref * 10.0 ** (-SQNR_CAP_DB / 10.0))
    return 10.0 * jnp.log10(ref / err)


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """What the sweep measures.

    ``bits``: candidate bit-widths (a subset of the allocator's 2/4/8). ``kinds``: ``"weight"``
    and/or ``"act"``. ``metric``: how a configuration's output is scored (quality layers, or
    every layer without groups). ``content_metric``: the score of ``"content"`` layers (MixDQ
    judges them by image SSIM); ``None``: ``metric``. ``chunk``: configurations per vmapped
    call (memory grows with it).
    """

    bits: tuple[int, ...] = SENSITIVITY_BITS
    kinds: tuple[str, ...] = KINDS
    metric: Metric = sqnr
    content_metric: Metric | None = None
    chunk: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(sorted({int(b) for b in self.bits})))
        bad = [b for b in self.bits if b not in SENSITIVITY_BITS]
        if not self.bits or bad:
            raise ValueError(f"SweepConfig: bits must be among {SENSITIVITY_BITS}, got {self.bits}")
        if not self.kinds or any(k not in KINDS for k in self.kinds):
            raise ValueError(f"SweepConfig: kinds must be among {KINDS}, got {self.kinds!r}")
        if self.chunk < 1:
            raise ValueError(f"SweepConfig: chunk must be >= 1, got {self.chunk}")


@dataclass(frozen=True, kw_only=True)
class Sensitivity:
    """The sweep's scores: ``scores[kind][layer]`` holds one score per bit-width of ``bits``,
    measured with the layer's group metric and averaged over the batches. ``metrics``: group ->
    ``"sqnr"`` (the built-in `sqnr`) or ``"custom"``, which tells the allocator how to read the
    scores. ``configurations``: single-layer configurations evaluated; ``compiles``: programs
    compiled for them."""

    bits: tuple[int, ...]
    scores: Mapping[str, Mapping[str, tuple[float, ...]]]
    metrics: Mapping[str, str]
    configurations: int
    compiles: int


def _axes(qconfig: QConfig) -> QConfig:
    """``vmap`` axes: 0 on the bit-widths, shared ranges and ``w_active`` hints."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: 0 if getattr(p[-1], "name", None) in _SWEPT else None, qconfig
    )


def _program(apply: ApplyFn, metrics: Sequence[Metric]) -> Callable:
    quantized_apply = fake_quantized(apply)

    def sweep_program(params: Any, qconfigs: QConfig, inputs: tuple) -> Array:
        reference = apply(params, *inputs)

        def one(qconfig: QConfig) -> Array:
            out = quantized_apply(params, qconfig, *inputs)
            values = [jnp.asarray(m(reference, out), jnp.float32) for m in metrics]
            if any(v.shape != () for v in values):
                raise ValueError("a sweep metric must return a scalar per configuration")
            return jnp.stack(values)

        return jax.vmap(one, in_axes=(_axes(qconfigs),))(qconfigs)

    return jax.jit(sweep_program)


def _chunk(base: QConfig, tasks: Sequence[tuple[str, str, int]], size: int) -> QConfig:
    """``size`` configurations (rows past ``len(tasks)`` all float): row ``j`` is ``base`` with
    one layer's weight or activation bits set by ``tasks[j] = (kind, layer, bits)``."""
    w = {n: np.full(size, FLOAT_BITS, np.int32) for n in base.layers}
    a = {n: np.full(size, FLOAT_BITS, np.int32) for n in base.layers}
    for j, (kind, name, bits) in enumerate(tasks):
        (w if kind == "weight" else a)[name][j] = bits
    layers = {n: replace(lq, w_bits=w[n], a_bits=a[n]) for n, lq in base.layers.items()}
    return mark_active_weights(replace(base, layers=layers))


def sweep(
    apply: ApplyFn,
    params: Any,
    batches: Sequence[Sequence[Any]],
    layers: Sequence[LayerInfo],
    ranges: Mapping[str, Any],
    *,
    config: SweepConfig = SweepConfig(),  # noqa: B008 - frozen
) -> Sensitivity:
    """Score every layer alone at every bit-width of ``config`` (weights and activations)
    against the float output of ``apply(params, *batch)`` for each batch of ``batches``.

    ``ranges``: the calibrated input ranges (`calibrate`), needed for activation bits.
    """
    batches = input_batches(batches)
    metrics = [config.metric] + ([config.content_metric] if config.content_metric else [])
    base = float_qconfig(layers, ranges)
    tasks = [(k, layer.name, b) for k in config.kinds for layer in layers for b in config.bits]
    program = _program(apply, metrics)
    size = min(config.chunk, len(tasks))
    totals = np.zeros((len(tasks), len(metrics)), np.float64)
    for start in range(0, len(tasks), size):
        part = tasks[start : start + size]
        qconfigs = _chunk(base, part, size)
        for batch in batches:
            with first_call("the layer-sensitivity sweep", program, params, qconfigs, batch):
                values = program(params, qconfigs, batch)
            totals[start : start + len(part)] += np.asarray(values, np.float64)[: len(part)]
    totals /= len(batches)

    column = {
        layer.name: 1 if config.content_metric and layer.group == "content" else 0
        for layer in layers
    }
    scores: dict[str, dict[str, list[float]]] = {k: {} for k in config.kinds}
    for (kind, name, _), row in zip(tasks, totals, strict=True):
        scores[kind].setdefault(name, []).append(float(row[column[name]]))
    content = config.content_metric or config.metric
    return Sensitivity(
        bits=config.bits,
        scores={k: {n: tuple(v) for n, v in s.items()} for k, s in scores.items()},
        metrics={
            "quality": "sqnr" if config.metric is sqnr else "custom",
            "content": "sqnr" if content is sqnr else "custom",
        },
        configurations=len(tasks),
        compiles=program._cache_size(),
    )
