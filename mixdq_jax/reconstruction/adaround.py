"""AdaRound (Nagel et al. 2020): learn, per weight, whether to round down or up.

The grid is the project's one grid (`pallas_kernels.grid`): per output channel (and per
input part of a shortcut-split layer) the same scale and zero point as the fake quantizer and
the packer, from the *float* kernel's range. Only the rounding changes::

    w_soft = s * (clip(floor(w / s) + h(V) + z, qmin, qmax) - z)
    h(V)   = clip(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

``V`` starts where ``h(V)`` is the fractional part of ``w / s`` (the float weight), the
regulariser ``sum(1 - |2 h(V) - 1| ** beta)`` pushes ``h`` to 0 or 1 while ``beta`` is annealed
from 20 to 2 after a warm-up (BRECQ's ``LinearTempDecay``), and hard rounding takes
``h(V) >= 0.5``, i.e. ``V >= 0``.

The learned codes leave as a float kernel (:func:`fold_codes`) whose *nearest* rounding on
the same grid gives exactly those codes, so the fake quantizer, the sensitivity tools and the
packer run it unchanged. That needs the folded kernel to keep each channel's range: the
elements that set a channel's min and max keep their nearest rounding (two weights per
channel are not learned; the grid cannot move), every other element is its dequantized value
clipped into the range, and the fold checks the round trip. Learned codes stay within the
nearest codes of the range's ends (`_code_bounds`): where an end sits exactly half a step
inside the grid's edge (an exactly symmetric channel, as random initialisations give), the
edge code is out of any range-keeping kernel's reach.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.quant.qconfig import input_parts
from pallas_kernels import grid

Array = jax.Array

ZETA = 1.1
GAMMA = -0.1
FORMATS = ("int", "int_sym")


def rectified_sigmoid(v: Array) -> Array:
    """``h(V)``: a sigmoid stretched to ``(gamma, zeta)`` and clipped to ``[0, 1]``, so that
    exact 0 and 1 are reachable with finite ``V``."""
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(v: Array, beta: Array | float) -> Array:
    """``sum(1 - |2 h(V) - 1| ** beta)``: zero when every ``h`` is 0 or 1."""
    return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def beta_schedule(
    step: Array | int, iters: int, *, warmup: float = 0.2, start: float = 20.0, end: float = 2.0
) -> tuple[Array, Array]:
    """``(beta, regularise)`` at ``step`` of ``iters`` (traceable): the regulariser is off
    during the first ``warmup`` fraction, then ``beta`` decays linearly from ``start`` to
    ``end`` (BRECQ's ``LinearTempDecay``)."""
    begin = warmup * iters
    step = jnp.asarray(step, jnp.float32)
    rel = (step - begin) / max(iters - begin, 1.0)
    beta = jnp.where(step < begin, start, end + (start - end) * jnp.maximum(0.0, 1.0 - rel))
    return beta, step >= begin


def _grid(w: Array, bits: Array, fmt: str) -> tuple[Array, Array | None, Array, Array]:
    """``(scale, zero, qmin, qmax)`` of a kernel part, per output channel (last axis)."""
    lo, hi = grid.channel_range(w)
    if fmt == "int":
        scale, zero, levels = grid.affine_params(lo, hi, bits)
        return scale, zero, jnp.float32(0.0), levels
    if fmt == "int_sym":
        scale, half = grid.symmetric_params(jnp.maximum(-lo, hi), bits)
        return scale, None, -half - 1.0, half
    raise ValueError(f"learned rounding supports weight formats {FORMATS}, not {fmt!r}")


def _fold_range(w: Array, fmt: str) -> tuple[Array, Array]:
    """The per-channel range a folded kernel keeps (so the grid stays where it is)."""
    lo, hi = grid.channel_range(w)
    if fmt == "int_sym":
        hi = jnp.maximum(-lo, hi)
        lo = -hi
    return lo, hi


def _code_bounds(
    w: Array, scale: Array, zero: Array | None, qmin: Array, qmax: Array, fmt: str
) -> tuple[Array, Array]:
    """Per channel, the codes a folded kernel can hold. Symmetric: ``[-half, half]`` (the
    range is ``[-absmax, absmax]``; the grid's extra code ``-half - 1`` lies beyond it).
    Asymmetric: from the nearest code of the range's low end to that of its high end (the
    channel's extreme elements, or 0 when the range was widened to contain it): mostly
    ``[0, levels]``, but when an end sits half a step inside the grid's edge (a tie: an
    exactly symmetric channel, as random initialisations give) the edge code is out of reach
    of any kernel that keeps the range, so learned rounding must not pick it. The extremes'
    codes are taken as the fake quantizer rounds the whole kernel (the same expression), so
    a tie falls the same way in both. ``scale`` .. ``qmax``: the channel grid (`_grid`)."""
    if fmt == "int_sym":
        return qmin + 1.0, qmax
    near = grid.codes(w, scale, zero, qmin, qmax)
    axes = tuple(range(w.ndim - 1))
    at_zero = grid.codes(jnp.zeros_like(scale), scale, zero, qmin, qmax)
    return (jnp.minimum(jnp.min(near, axis=axes), at_zero),
            jnp.maximum(jnp.max(near, axis=axes), at_zero))  # fmt: skip


def _extremes(w: Array) -> Array:
    """Elements equal to their channel's min or max (they keep nearest rounding)."""
    axes = tuple(range(w.ndim - 1))
    wf = w.astype(jnp.float32)
    return (wf == jnp.min(wf, axis=axes)) | (wf == jnp.max(wf, axis=axes))


def _per_part(kernel: Array, split: int | None, fn, *others: Array) -> Array:
    parts = input_parts(split, kernel.shape[-2])
    outs = [fn(kernel[..., a:b, :], *(o[..., a:b, :] for o in others)) for a, b in parts]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-2)


@partial(jax.jit, static_argnames=("fmt", "split"))
def init_rounding(kernel: Array, bits: Array | int, *, fmt: str = "int", split: int | None = None):
    """``V`` (f32, the kernel's shape) with ``h(V)`` equal to the fractional part of
    ``w / s``."""

    def part(w: Array) -> Array:
        scale, _, _, _ = _grid(w, bits, fmt)
        x = w.astype(jnp.float32) / scale
        frac = x - jnp.floor(x)
        return -jnp.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)

    return _per_part(kernel, split, part)


def _codes(w: Array, v: Array, bits: Array, fmt: str, soft: bool | Array) -> Array:
    scale, zero, qmin, qmax = _grid(w, bits, fmt)
    x = w.astype(jnp.float32) / scale
    base = jnp.floor(x)
    up = jnp.where(soft, rectified_sigmoid(v), (v >= 0).astype(jnp.float32))
    up = jnp.where(_extremes(w), jnp.round(x) - base, up)
    q = base + up + (0.0 if zero is None else zero)
    return jnp.clip(q, *_code_bounds(w, scale, zero, qmin, qmax, fmt))


def rounded_kernel(
    kernel: Array,
    v: Array,
    bits: Array | int,
    *,
    fmt: str = "int",
    split: int | None = None,
    soft: bool | Array = True,
) -> Array:
    """The kernel quantized with learned rounding (``soft``: ``h(V)``, differentiable in
    ``V``; else hard ``V >= 0``), in the kernel's dtype; float bits return the kernel."""

    def part(w: Array, vp: Array) -> Array:
        scale, zero, _, _ = _grid(w, bits, fmt)
        return grid.dequantize(_codes(w, vp, bits, fmt, soft), scale, zero).astype(w.dtype)

    return jnp.where(grid.is_float(bits), kernel, _per_part(kernel, split, part, v))


@partial(jax.jit, static_argnames=("fmt", "split"))
def learned_codes(
    kernel: Array, v: Array, bits: Array | int, *, fmt: str = "int", split: int | None = None
) -> Array:
    """The hard-rounded integer codes (f32, integer-valued) on the grid's own code range."""
    return _per_part(kernel, split, lambda w, vp: _codes(w, vp, bits, fmt, False), v)


@partial(jax.jit, static_argnames=("fmt", "split"))
def nearest_codes(
    kernel: Array, bits: Array | int, *, fmt: str = "int", split: int | None = None
) -> Array:
    """The fake quantizer's (nearest-rounding) codes of ``kernel``, for comparison."""

    def part(w: Array) -> Array:
        scale, zero, qmin, qmax = _grid(w, bits, fmt)
        return grid.codes(w, scale, zero, qmin, qmax)

    return _per_part(kernel, split, part)


@partial(jax.jit, static_argnames=("fmt", "split"))
def _folded(kernel: Array, v: Array, bits: Array, *, fmt: str, split: int | None) -> Array:
    def part(w: Array, vp: Array) -> Array:
        scale, zero, _, _ = _grid(w, bits, fmt)
        lo, hi = _fold_range(w, fmt)
        deq = grid.dequantize(_codes(w, vp, bits, fmt, False), scale, zero)
        folded = jnp.where(_extremes(w), w.astype(jnp.float32), jnp.clip(deq, lo, hi))
        return folded.astype(w.dtype)

    return _per_part(kernel, split, part, v)


def fold_codes(
    kernel: Array,
    v: Array,
    bits: int,
    *,
    fmt: str = "int",
    split: int | None = None,
    name: str = "<layer>",
) -> Array:
    """A kernel (the input's dtype) whose nearest rounding on the grid is the learned codes:
    each channel's range is kept, every other element is its dequantized value clipped into
    it (the codes stay within `_code_bounds`, so it fits). ``ValueError`` naming the layer if
    the round trip fails (a bug)."""
    if bits >= grid.FLOAT_BITS:
        return kernel
    folded = _folded(kernel, v, bits, fmt=fmt, split=split)
    want = np.asarray(learned_codes(kernel, v, bits, fmt=fmt, split=split))
    got = np.asarray(nearest_codes(folded, bits, fmt=fmt, split=split))
    bad = int(np.sum(want != got))
    if bad:
        raise ValueError(
            f"layer {name!r}: {bad} learned code(s) do not survive folding into a {kernel.dtype} "
            f"kernel at {bits} bits (the grid moved; a bug in mixdq-jax, please report it); "
            "leave this layer out of --recon-blocks to go on"
        )
    return folded
