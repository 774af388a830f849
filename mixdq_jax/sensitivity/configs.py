"""The configurations a sweep evaluates: the all-float base and stacked single-layer
variants of it (bit-widths are data: one stacked ``QConfig`` per chunk)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import jax
import numpy as np

from mixdq_jax.pipeline import Pipeline
from mixdq_jax.quant.build import qconfig_for
from mixdq_jax.quant.qconfig import FLOAT_BITS, QConfig, QuantSpec, mark_active_weights
from mixdq_jax.sensitivity.config import KINDS


def base_qconfig(
    pipe: Pipeline,
    spec: QuantSpec,
    ranges: Mapping[str, Any],
    layers: Sequence[str] | None = None,
) -> QConfig:
    """The all-float configuration (with the calibrated ranges) that sweeps start from, of
    every layer or of ``layers`` only (a layer absent from a config runs untouched)."""
    spec = replace(
        spec,
        weight_bits=FLOAT_BITS,
        act_bits=FLOAT_BITS,
        default_weight_bits=None,
        default_act_bits=None,
        protected_weights=frozenset(),
        protected_acts=frozenset(),
    )
    qc = qconfig_for(pipe, spec, ranges)
    if layers is not None:
        qc = replace(qc, layers={n: qc.layers[n] for n in layers})
    return qc


def single_layer_qconfigs(base: QConfig, kind: str, tasks: Sequence[tuple[str, int]]) -> QConfig:
    """``stack_qconfigs([base.with_bits(...{layer: bits}) for layer, bits in tasks])``, built
    with numpy in one pass (a chunk holds thousands of leaves; one device transfer later)."""
    n = len(tasks)
    stacked = jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], n, axis=0), base)
    attr = "w_bits" if kind == "weight" else "a_bits"
    for j, (name, bits) in enumerate(tasks):
        getattr(stacked.layers[name], attr)[j] = bits
    return stacked


FORMAT_KIND = "format"  # a sweep over per-layer formats (`mixdq_jax.sensitivity.formats`)


def swept_attrs(kind: str) -> tuple[str, ...]:
    """The ``LayerQConfig`` leaves a sweep of ``kind`` varies (a format sweep varies both
    bit-widths and the per-layer FP8 choice)."""
    if kind == FORMAT_KIND:
        return ("w_bits", "a_bits", "fp8")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {(*KINDS, FORMAT_KIND)}, got {kind!r}")
    return ("w_bits" if kind == "weight" else "a_bits",)


def bits_attr(kind: str) -> str:
    """The ``LayerQConfig`` leaf a sweep of ``kind`` varies."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return swept_attrs(kind)[0]


def is_swept_leaf(path: tuple, attrs: str | tuple[str, ...]) -> bool:
    """Whether a pytree path (``tree_map_with_path``) ends at a swept leaf of ``attrs``."""
    attrs = (attrs,) if isinstance(attrs, str) else attrs
    return getattr(path[-1], "name", None) in attrs


def split_swept(qconfigs: QConfig, kind: str) -> QConfig:
    """A stacked single-layer configuration with the configuration axis kept only on the swept
    kind's leaves (the other leaves are equal across configurations: their first row).

    Why: under ``vmap`` a batched weight bit-width batches that layer's kernel, so an activation
    sweep would carry one copy of every kernel per configuration; with only ``a_bits`` batched
    the kernels stay shared and each layer runs as one large op over all configurations.
    A sweep that batches ``w_bits`` (weights, formats) also gives each layer the unbatched
    ``w_active`` hint (:func:`mark_active_weights`): only the layers this chunk quantizes
    compute dequantized copies (one per configuration); the others run their float kernel,
    shared, behind a real ``lax.cond``.
    """
    attrs = swept_attrs(kind)
    split = jax.tree_util.tree_map_with_path(
        lambda p, x: x if is_swept_leaf(p, attrs) else x[0], qconfigs
    )
    return split if kind == "act" else mark_active_weights(split)
