"""Clipping-range search: the range of lowest Lp quantization error among shrunk min/max ranges.

Q-Diffusion (and BRECQ before it) initialise every quantizer with ``scale_method 'mse'``: the
candidate ranges are ``r * [min, max]`` for ``r = 1, 0.99, ..., 0.21`` (80 ratios), and the one
whose quantized tensor has the lowest mean ``|x - Q(x)|^2.4`` wins (LAPQ's Lp norm; ties keep
the widest range). Weights are searched per output channel (per input part of a split layer
too, as the shortcut split quantizes each part on its own), activations per tensor (per input
part). The ranges are the project's one grid (`pallas_kernels.grid`), so a candidate always
contains 0: where a tensor's minimum is positive, upstream's grid starts above 0 and ours at 0.

Weights: :func:`weight_clip_errors` scores every ratio of every channel; the chosen ratio is
applied by clipping the kernel (:func:`clip_kernel`), so the clipped kernel's own min/max is
the searched range and the fake quantizer, packer and integer path need nothing new.

Activations: the errors of every candidate are summed over calibration data inside one traced
forward (`SearchActRanges`, a collecting mode: one compile for every layer, one candidate's copy
of an input alive at a time); :func:`search_act_ranges` runs it over the data after a first
pass that finds each input's min/max.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.quant.intercept import LayerCall, Mode, Records, intercept
from mixdq_jax.quant.modes import Observe, update_ranges
from mixdq_jax.quant.qconfig import FLOAT_BITS, LayerQConfig, QConfig, input_parts
from mixdq_jax.quant.quantizers import fake_quant, quantize_weight, weight_range

Array = jax.Array

UPSTREAM_CANDIDATES = 80
"""Q-Diffusion's ``for i in range(80)``: ratios ``1 - 0.01 i`` of the min/max range."""
UPSTREAM_STEP = 0.01
UPSTREAM_P = 2.4
"""The Lp exponent of upstream's range search (``lp_loss(x, x_q, p=2.4)``)."""


def clip_ratios(candidates: int = UPSTREAM_CANDIDATES, step: float = UPSTREAM_STEP) -> np.ndarray:
    """``1 - step * i`` for ``i < candidates`` (float32, widest first, so ``argmin`` keeps the
    widest of equal errors as upstream's strict ``<`` does)."""
    if candidates < 1 or step <= 0.0 or (candidates - 1) * step >= 1.0:
        raise ValueError(
            f"clip ratios: {candidates} candidates of step {step} must stay above 0 "
            "(candidates >= 1, step > 0, (candidates - 1) * step < 1)"
        )
    return (1.0 - step * np.arange(candidates, dtype=np.float64)).astype(np.float32)


# ------------------------------------------------------------------------------ weights
def _check_format(fmt: str) -> None:
    if fmt not in ("int", "int_sym"):
        raise ValueError(f"range search: weight format {fmt!r} has no clipping range (int or "
                         "int_sym weights only)")  # fmt: skip


def clip_kernel(kernel: Array, ratio: Array | float, *, split: int | None = None) -> Array:
    """The kernel with each output channel (last axis) of each input part clipped to ``ratio``
    times its ``[min, max]`` (widened to contain 0). ``ratio``: a scalar or ``[parts, out]``."""
    parts = input_parts(split, kernel.shape[-2])
    ratio = jnp.broadcast_to(jnp.asarray(ratio, jnp.float32), (len(parts), kernel.shape[-1]))
    out = []
    for j, (a, b) in enumerate(parts):
        k = kernel[..., a:b, :].astype(jnp.float32)
        lo, hi = weight_range(k)
        out.append(jnp.clip(k, ratio[j] * lo, ratio[j] * hi))
    clipped = out[0] if len(out) == 1 else jnp.concatenate(out, axis=-2)
    return clipped.astype(kernel.dtype)


@partial(jax.jit, static_argnames=("p", "fmt", "split"))
def weight_clip_errors(
    kernel: Array,
    bits: Array | int,
    ratios: Array,
    *,
    p: float = UPSTREAM_P,
    fmt: str = "int",
    split: int | None = None,
) -> Array:
    """``[ratios, parts, out]``: per ratio, input part and output channel, the mean
    ``|W - Q(clip_r(W))|^p`` over the channel's weights (one ratio's copy at a time)."""
    _check_format(fmt)
    parts = input_parts(split, kernel.shape[-2])

    def errors(ratio: Array) -> Array:
        rows = []
        for a, b in parts:
            k = kernel[..., a:b, :].astype(jnp.float32)
            lo, hi = weight_range(k)
            q = quantize_weight(jnp.clip(k, ratio * lo, ratio * hi), bits, fmt=fmt)
            rows.append(jnp.mean(jnp.abs(k - q) ** p, axis=tuple(range(k.ndim - 1))))
        return jnp.stack(rows)

    return jax.lax.map(errors, jnp.asarray(ratios, jnp.float32))


def search_weight_clip(
    kernel: Array,
    bits: int,
    ratios: np.ndarray,
    *,
    p: float = UPSTREAM_P,
    fmt: str = "int",
    split: int | None = None,
) -> np.ndarray:
    """``[parts, out]`` indices into ``ratios`` of the lowest Lp error (the widest on a tie)."""
    errors = weight_clip_errors(kernel, jnp.int32(bits), jnp.asarray(ratios), p=p, fmt=fmt,
                                split=split)  # fmt: skip
    return np.argmin(np.asarray(errors), axis=0)


# ------------------------------------------------------------------------------ activations
def act_clip_errors(x: Array, bits: Array | int, lo: Array, hi: Array, ratios: Array,
                    p: float) -> Array:  # fmt: skip
    """``[ratios]``: the summed ``|x - Q(x)|^p`` of ``x`` fake-quantized on ``r * [lo, hi]``."""
    xf = x.astype(jnp.float32)

    def error(ratio: Array) -> Array:
        return jnp.sum(jnp.abs(xf - fake_quant(xf, bits, ratio * lo, ratio * hi)) ** p)

    return jax.lax.map(error, jnp.asarray(ratios, jnp.float32))


def _part_errors(x: Array, lq: LayerQConfig, ratios: Array, p: float) -> Array:
    """``[parts, ratios]`` for one call of a layer whose ``a_range`` holds the base ranges."""
    if lq.bos:  # token 0 is not quantized in a BOS-aware layer: its range leaves it out
        x = x[..., 1:, :]
    return jnp.stack([
        act_clip_errors(x[..., a:b], lq.a_bits, lq.a_range[j, 0], lq.a_range[j, 1], ratios, p)
        for j, (a, b) in enumerate(input_parts(lq.split, x.shape[-1]))
    ])  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class SearchActRanges(Mode):
    """Record, for the layers ``names``, the summed Lp error (``p``) of every candidate range
    ``ratio * a_range`` (``[parts, len(ratios)]``; a layer called twice: summed) at the
    configuration's activation bits; every layer runs as `Observe` does (weights as
    configured, activations float), so each layer sees the inputs calibration would."""

    names: frozenset[str]
    ratios: tuple[float, ...]
    p: float = UPSTREAM_P

    collects = True

    def layers(self, qconfig: QConfig) -> Collection[str]:
        return qconfig.layers

    def handle(self, call: LayerCall, qconfig: QConfig, records: Records) -> Array:
        if call.name in self.names:
            ratios = jnp.asarray(self.ratios, jnp.float32)
            errors = _part_errors(call.x, qconfig.layers[call.name], ratios, self.p)
            records.add(call.name, errors, jnp.add)
        return Observe().handle(call, qconfig, Records())


@dataclass(frozen=True, kw_only=True)
class ActSearch:
    """The result per searched layer: ``base`` (the observed ``[parts, 2]`` min/max),
    ``errors`` (``[parts, candidates]`` summed over the data), ``index`` (``[parts]``, the
    chosen ratio) and ``ranges`` (``[parts, 2]``: the chosen ratio times ``base``)."""

    base: dict[str, np.ndarray]
    errors: dict[str, np.ndarray]
    index: dict[str, np.ndarray]
    ranges: dict[str, np.ndarray]


def _chunks(data: Any, batch_size: int) -> Iterator[Any]:
    sizes = {int(np.shape(a)[0]) for a in jax.tree.leaves(data)}
    if len(sizes) != 1:
        raise ValueError(f"range search data: leaves disagree on the sample count {sorted(sizes)}")
    n = sizes.pop()
    for start in range(0, n, batch_size):
        yield jax.tree.map(lambda a, s=start: a[s : s + batch_size], data)


def _collect(apply: Callable[..., Any], mode: Mode, params: Any, qconfig: QConfig,
             batch: Any) -> dict[str, Array]:  # fmt: skip
    with intercept(mode, qconfig) as records:
        apply(params, batch)
    return records.data


def search_act_ranges(
    apply: Callable[..., Any],
    params: Any,
    qconfig: QConfig,
    data: Any,
    *,
    ratios: np.ndarray,
    p: float = UPSTREAM_P,
    batch_size: int = 16,
    names: Sequence[str] | None = None,
) -> ActSearch:
    """Search the activation range of every layer of ``qconfig`` with activation bits < 16
    (or of ``names``) on ``data`` (a pytree with a leading sample axis; ``apply(params,
    batch)`` runs the model), ``batch_size`` samples per call.

    Two passes, each one compiled program: the inputs' min/max (`Observe`), then the Lp error
    of every ``ratio * [min, max]`` summed over the data (`SearchActRanges`). Both run the
    model with weights as ``qconfig`` sets them and activations float.
    """
    _, a_bits = qconfig.bits()
    names = [n for n, b in a_bits.items() if b < FLOAT_BITS] if names is None else list(names)
    if not names:
        return ActSearch(base={}, errors={}, index={}, ranges={})
    ratios = np.asarray(ratios, np.float32)
    observe = jax.jit(partial(_collect, apply, Observe()))
    base: dict[str, Array] | None = None
    for batch in _chunks(data, batch_size):
        base = update_ranges(base, observe(params, qconfig, batch), method="minmax")
    if base is None:
        raise ValueError("range search: no calibration samples in the data")
    layers = {n: replace(qconfig.layers[n], a_range=base[n]) for n in names}
    searching = replace(qconfig, layers={**qconfig.layers, **layers})
    mode = SearchActRanges(names=frozenset(names), ratios=tuple(float(r) for r in ratios), p=p)
    score = jax.jit(partial(_collect, apply, mode))
    sums: dict[str, np.ndarray] = {}
    for batch in _chunks(data, batch_size):
        for name, err in score(params, searching, batch).items():
            err = np.asarray(err, np.float64)
            sums[name] = sums[name] + err if name in sums else err
    out_base = {n: np.asarray(base[n], np.float32) for n in names}
    index = {n: np.argmin(sums[n], axis=1) for n in names}
    ranges = {n: ratios[index[n]][:, None] * out_base[n] for n in names}
    return ActSearch(base=out_base, errors=sums, index=index, ranges=ranges)


def with_act_ranges(qconfig: QConfig, ranges: Mapping[str, np.ndarray]) -> QConfig:
    """``qconfig`` with the ``[parts, 2]`` activation ranges of some layers replaced."""
    layers = dict(qconfig.layers)
    for name, rng in ranges.items():
        lq = layers[name]
        if np.shape(rng) != np.shape(lq.a_range):
            raise ValueError(f"act range of {name!r}: shape {np.shape(rng)}, the layer's "
                             f"configuration has {np.shape(lq.a_range)}")  # fmt: skip
        layers[name] = replace(lq, a_range=jnp.asarray(rng, jnp.float32))
    return replace(qconfig, layers=layers)
