"""The library's layer modes (see `intercept`): float, fake quantization, range observation,
shape recording and feature collection. The deployed integer path is
`mixdq_jax.deploy.layers.Deployed`.

Fake quantization: for a layer in the ``QConfig`` the input activation is fake-quantized per
tensor (per input part for a shortcut-split layer) and the kernel per output channel, and the
layer's own Flax code runs on them, so float settings reproduce the float model bit for bit.
BOS-aware layers (MixDQ sec. 3.1: the text embedding's BOS token is the same for every prompt)
take their token-0 output row from the float layer.

Observation (calibration) runs activations in float, weights as configured, and records each
layer's input range per input part as a ``[parts, 2]`` array of ``(lo, hi)`` containing 0,
token 0 excluded for BOS-aware layers; accumulate batches with :func:`update_ranges`.
:class:`ObserveQuantized` is the released MixDQ loop instead: running ranges updated at every
call and the activations quantized with them while observing.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.quant.intercept import LayerCall, Mode, Records, union_ranges
from mixdq_jax.quant.lowrank import LOWRANK_BITS, LowRank, branch_kernel, smoothed_kernel
from mixdq_jax.quant.qconfig import LayerQConfig, QConfig, input_parts
from mixdq_jax.quant.quantizers import quantize_activation, quantize_weight
from pallas_kernels import grid, im2col

Array = jax.Array


@dataclass(frozen=True, kw_only=True)
class Float(Mode):
    """No interception at all: the model as written."""

    def handle(self, call: LayerCall, qconfig: Any, records: Records) -> Array:
        return call.original()


def _minmax(x: Array) -> Array:
    xf = x.astype(jnp.float32)
    return jnp.stack([jnp.minimum(jnp.min(xf), 0.0), jnp.maximum(jnp.max(xf), 0.0)])


def _check(call: LayerCall, kernel: Array, lq: LayerQConfig) -> None:
    if lq.split is not None and not 0 < lq.split < kernel.shape[-2]:
        raise ValueError(
            f"layer {call.name!r}: split {lq.split} outside its {kernel.shape[-2]} input channels"
        )
    if lq.bos and call.x.ndim < 3:
        raise ValueError(
            f"layer {call.name!r}: BOS-aware layer expects (..., tokens, channels) input, got "
            f"shape {call.x.shape}"
        )


def _quantized_kernel(kernel: Array, x: Array, lq: LayerQConfig, fmt: str) -> Array:
    """Per output channel, each input part (axis -2 for Dense and Conv) on its own.

    Memory, not just math: the bits are traced, so "keep float" is decided at run time, and
    the dequantized weights would depend only on the weights and bits: XLA may compute every
    layer's copy before the first layer runs (a second model in memory; at SDXL size the
    process is killed). So the bits are tied to this layer's input (:func:`_tied_to`): each
    copy is made when its layer runs and dies with it. Float bits skip the work with a
    ``lax.cond`` (under ``vmap`` over batched bits a select: still one layer at a time, but
    every configuration's copy is computed; ``LayerQConfig.w_active`` skips inactive layers).
    (``lax.optimization_barrier`` does not order this on XLA:CPU; measured.)
    """
    bits = _tied_to(lq.w_bits, x)

    def quantize(k: Array) -> Array:
        parts = input_parts(lq.split, k.shape[-2])
        qs = [_per_layer_grid(quantize_weight, lq, k[..., a:b, :], bits, fmt=fmt)
              for a, b in parts]  # fmt: skip
        return qs[0] if len(qs) == 1 else jnp.concatenate(qs, axis=-2)

    return jax.lax.cond(grid.is_float(bits), lambda k: k, quantize, kernel)


def _per_layer_grid(quantize: Callable, lq: LayerQConfig, *args: Any, fmt: str) -> Array:
    """``quantize(*args, fmt=fmt)``, or with a per-layer FP8 choice (`LayerQConfig.fp8`)
    both grids' results and the chosen one selected (data: one compile for every choice)."""
    if lq.fp8 is None:
        return quantize(*args, fmt=fmt)
    return jnp.where(lq.fp8, quantize(*args, fmt="fp8"), quantize(*args, fmt=fmt))


def _tied_to(bits: Array, x: Array) -> Array:
    """``bits`` plus an int32 zero computed from ``x`` (the sign bit of its first element,
    shifted down, then min with 0): the same value, but a real data dependency that XLA
    cannot fold away, so work on the bits waits for ``x``."""
    first = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.int32)
    zero = jnp.minimum(jax.lax.shift_right_logical(first, jnp.int32(31)), 0)
    return jnp.asarray(bits).astype(jnp.int32) + zero


def _quantized_input(x: Array, lq: LayerQConfig, fmt: str) -> Array:
    parts = input_parts(lq.split, x.shape[-1])
    qs = [
        _per_layer_grid(quantize_activation, lq, x[..., a:b], lq.a_bits, lq.a_range[j, 0],
                        lq.a_range[j, 1], fmt=fmt)
        for j, (a, b) in enumerate(parts)
    ]  # fmt: skip
    return qs[0] if len(qs) == 1 else jnp.concatenate(qs, axis=-1)


def _observed_range(x: Array, lq: LayerQConfig) -> Array:
    if lq.bos:
        x = x[..., 1:, :]
    return jnp.stack([_minmax(x[..., a:b]) for a, b in input_parts(lq.split, x.shape[-1])])


def _fake_quant_call(
    call: LayerCall, qconfig: QConfig, records: Records, observe: bool,
    lq: LayerQConfig | None = None,
) -> Array:  # fmt: skip
    lq = qconfig.layers[call.name] if lq is None else lq
    params = call.params
    kernel = params["kernel"]
    _check(call, kernel, lq)
    x = call.x
    if lq.group is not None:
        return _grouped_call(call, lq, records, observe)
    if observe:
        records.add(call.name, _observed_range(x, lq), union_ranges)
        xq = x
    else:
        xq = _quantized_input(x, lq, qconfig.act_format)

    def quantized(xq: Array) -> Array:
        wq = _quantized_kernel(kernel, x, lq, qconfig.weight_format)
        return call.apply({**params, "kernel": wq}, xq)

    if lq.w_active is None:
        out = quantized(xq)
    else:  # an unbatched hint: a real cond under vmap (see LayerQConfig.w_active)
        out = jax.lax.cond(lq.w_active, quantized, lambda xq: call.apply(params, xq), xq)
    if lq.bos:
        row0 = call.apply(params, x)[..., :1, :]
        out = jnp.concatenate([row0, out[..., 1:, :]], axis=-2)
    return out


def _branch(call: LayerCall, lowrank: LowRank, xs: Array) -> Array:
    """``(x / s) L1 L2``: ``down`` runs as the layer itself (a conv keeps its geometry) with
    ``rank`` outputs and no bias, ``up`` as a matrix."""
    if call.kind == "linear":
        low = xs @ lowrank.down.astype(xs.dtype)
    elif isinstance(call.module, nn.Conv):
        low = call.module.clone(parent=None, features=lowrank.rank, use_bias=False).apply(
            {"params": {"kernel": lowrank.down.astype(xs.dtype)}}, xs
        )
    else:
        raise ValueError(
            f"layer {call.name!r}: the low-rank branch runs on linen convs and on Dense / "
            "nnx.Linear layers only"
        )
    return low @ lowrank.up.astype(low.dtype)


def _grouped_call(call: LayerCall, lq: LayerQConfig, records: Records, observe: bool) -> Array:
    """SVDQuant's format (`LayerQConfig.group`): smoothing, the residual of the low-rank
    branch and the input quantized in groups, the branch in float. Everything float: the
    layer as written, bit for bit (smoothing by 1, the branch skipped, the layer's own op at
    the top level as in the float model). The weights' work is tied to this layer's input, as
    in `_quantized_kernel` (one layer's copies alive at a time)."""
    params, x, group, lowrank = call.params, call.x, lq.group, lq.lowrank
    if observe:
        records.add(call.name, _observed_range(x, lq), union_ranges)
    a_bits = jnp.asarray(grid.FLOAT_BITS if observe else lq.a_bits)
    kernel = params["kernel"]
    bits = _tied_to(lq.w_bits, x)

    def quantize(k: Array) -> Array:
        return grid.group_fake_quant_kernel(k, bits, group)

    if lowrank is None:
        xs, on = x, None
        wq = jax.lax.cond(grid.is_float(bits), lambda k: k, quantize, kernel)
    else:
        smoothing = ~(grid.is_float(bits) & grid.is_float(a_bits))
        smooth = jnp.where(smoothing, lowrank.smooth.astype(jnp.float32), 1.0)
        xs = (x.astype(jnp.float32) / smooth).astype(x.dtype)
        on = bits <= LOWRANK_BITS

        def prepare(k: Array) -> Array:
            resid = smoothed_kernel(k, smooth) - jnp.where(on, branch_kernel(lowrank), 0.0)
            return jnp.where(grid.is_float(bits), resid, quantize(resid)).astype(k.dtype)

        wq = jax.lax.cond(smoothing, prepare, lambda k: k, kernel)

    def quantized(xs: Array) -> Array:
        out = call.apply({**params, "kernel": wq}, grid.group_fake_quant(xs, a_bits, group))
        if on is None:
            return out
        return jax.lax.cond(
            on, lambda o, xs: o + _branch(call, lowrank, xs).astype(o.dtype), lambda o, xs: o,
            out, xs,
        )  # fmt: skip

    if lq.w_active is None:
        out = quantized(xs)
    else:  # an unbatched hint (see LayerQConfig.w_active): inactive layers run as written
        active = lq.w_active | ~grid.is_float(a_bits)
        out = jax.lax.cond(active, quantized, lambda _: call.apply(params, x), xs)
    if lq.bos:
        row0 = call.apply(params, x)[..., :1, :]
        out = jnp.concatenate([row0, out[..., 1:, :]], axis=-2)
    return out


@dataclass(frozen=True, kw_only=True)
class FakeQuant(Mode):
    """Fake-quantize every layer of the ``QConfig`` (bits, ranges and formats from it)."""

    def layers(self, qconfig: QConfig) -> Collection[str]:
        return qconfig.layers

    def handle(self, call: LayerCall, qconfig: QConfig, records: Records) -> Array:
        return _fake_quant_call(call, qconfig, records, observe=False)


@dataclass(frozen=True, kw_only=True)
class Observe(Mode):
    """Record every configured layer's input range (``[parts, 2]``); weights as configured,
    activations float."""

    collects = True

    def layers(self, qconfig: QConfig) -> Collection[str]:
        return qconfig.layers

    def handle(self, call: LayerCall, qconfig: QConfig, records: Records) -> Array:
        return _fake_quant_call(call, qconfig, records, observe=True)


@dataclass(frozen=True, kw_only=True)
class ObserveQuantized(Mode):
    """The released MixDQ calibration loop (its ``running_stat`` quantizers with activation
    quantization on): each layer updates its running range with this call's range, then
    quantizes its input with the updated range at the configuration's activation bits (and its
    weights as configured), so later layers see quantized inputs. The running range is data:
    the configuration's ``a_range`` holds the range before this call (NaN: none yet, this
    call's range starts it) and the mode records the updated one. ``momentum``: per call
    (``m ** u`` for ``u`` updates of the same value: the released quantizer updates once per
    bit-width of its ``mixed_precision`` list, three times a call)."""

    momentum: float = 0.95
    collects = True

    @staticmethod
    def running(qconfig: QConfig, ranges: Mapping[str, Any] | None = None) -> QConfig:
        """``qconfig`` with each layer's running range set to ``ranges[name]`` (the records
        of the call before), or NaN for none yet (the first call starts them)."""
        layers = {
            name: replace(
                lq,
                a_range=jnp.full(lq.a_range.shape, jnp.nan, jnp.float32)
                if ranges is None
                else jnp.asarray(ranges[name], jnp.float32).reshape(lq.a_range.shape),
            )
            for name, lq in qconfig.layers.items()
        }
        return replace(qconfig, layers=layers)

    def layers(self, qconfig: QConfig) -> Collection[str]:
        return qconfig.layers

    def handle(self, call: LayerCall, qconfig: QConfig, records: Records) -> Array:
        lq = qconfig.layers[call.name]
        seen = _observed_range(call.x, lq)
        prev = lq.a_range.astype(jnp.float32)
        new = jnp.where(jnp.isnan(prev), seen, self.momentum * prev + (1.0 - self.momentum) * seen)
        records.add(call.name, new, union_ranges)
        return _fake_quant_call(call, qconfig, records, observe=False,
                                lq=replace(lq, a_range=new))  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class RecordShapes(Mode):
    """Record ``(kind, input shape without the batch axis)`` of every Dense/Conv, also while
    the model initialises (the layer registry traces ``init`` under ``jax.eval_shape``)."""

    collects = True
    on_init = True

    def handle(self, call: LayerCall, qconfig: Any, records: Records) -> Array:
        records.add(call.name, (call.kind, tuple(call.x.shape[1:])), lambda old, new: old)
        return call.original()


@dataclass(frozen=True, kw_only=True)
class CollectFeatures(Mode):
    """Record ``feature(output)`` of every named layer (summed when a layer runs twice);
    the layers run in float."""

    names: frozenset[str]
    feature: Callable[[Array], Array]

    collects = True

    def layers(self, qconfig: Any) -> Collection[str]:
        return self.names

    def handle(self, call: LayerCall, qconfig: Any, records: Records) -> Array:
        out = call.original()
        records.add(call.name, self.feature(out), jnp.add)
        return out


def conv_geometry(module: nn.Conv, name: str) -> tuple[int, int]:
    """(stride, padding) of a conv with square strides, symmetric padding, no dilation or
    feature groups (every UNet conv; the int8 kernels and the patch sampler need it)."""
    strides = module.strides or 1
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    pad = module.padding
    if isinstance(pad, str):
        if pad.upper() != "VALID":
            raise ValueError(f"layer {name!r}: padding {pad!r} is not supported")
        pad = ((0, 0), (0, 0))
    elif isinstance(pad, int):
        pad = ((pad, pad), (pad, pad))
    pads = {int(p) for pair in pad for p in (pair if isinstance(pair, tuple | list) else (pair,))}
    dil = module.kernel_dilation or 1
    if (
        len(set(strides)) != 1
        or len(pads) != 1
        or module.feature_group_count != 1
        or (dil if isinstance(dil, int) else max(dil)) != 1
        or (module.input_dilation or 1) not in (1, (1, 1))
    ):
        raise ValueError(
            f"layer {name!r}: only square strides, symmetric padding, no dilation or groups"
        )
    return strides[0], pads.pop()


def layer_patches(call: LayerCall, x: Array) -> Array:
    """The layer's GEMM rows: ``[positions_out, kernel positions, cin]`` (a Dense: one kernel
    position), so that ``rows.reshape(n, -1) @ kernel.reshape(-1, out)`` is the layer's output
    without bias at those positions (a conv's patches: `pallas_kernels.im2col`)."""
    cin = x.shape[-1]
    if call.kind == "linear":
        return x.reshape(-1, 1, cin)
    if not isinstance(call.module, nn.Conv):
        raise ValueError(f"layer {call.name!r}: patches of linen convs only")
    ks = tuple(call.module.kernel_size)
    stride, pad = conv_geometry(call.module, call.name)
    patches = im2col(x.astype(jnp.float32), ks, stride, pad, 0.0)
    return patches.reshape(-1, int(np.prod(ks)), cin)


def _sample(rows: Array, n: int) -> Array:
    """``n`` rows evenly spaced over ``rows`` (all of them when fewer)."""
    if rows.shape[0] <= n:
        return rows
    return rows[np.linspace(0, rows.shape[0] - 1, n).round().astype(np.int64)]


@dataclass(frozen=True, kw_only=True)
class CollectInputs(Mode):
    """Record, per configured layer, its input's per-channel absolute maximum ``(cin,)``
    (the smoothing statistics) and ``rows`` patch rows ``[rows, kernel positions, cin]``
    evenly spaced over the call's output positions (the low-rank search's sample); token 0
    of BOS-aware layers is left out (it runs in float). The layers run in float."""

    rows: int = 64
    collects = True

    def layers(self, qconfig: QConfig) -> Collection[str]:
        return qconfig.layers

    def handle(self, call: LayerCall, qconfig: QConfig, records: Records) -> Array:
        lq = qconfig.layers[call.name]
        x = call.x[..., 1:, :] if lq.bos else call.x
        absmax = jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1]), axis=0)
        records.add(call.name, absmax, jnp.maximum)
        sample = _sample(layer_patches(call, x), self.rows)
        records.add(f"{call.name}#rows", sample, lambda a, b: jnp.concatenate([a, b]))
        return call.original()


def default_mode(qconfig: Any) -> Mode:
    """Fake quantization when a configuration is given, float otherwise."""
    return Float() if qconfig is None else FakeQuant()


def update_ranges(
    running: Mapping[str, Array] | None,
    batch: Mapping[str, Array],
    *,
    method: str = "minmax",
    momentum: float = 0.95,
) -> dict[str, Array]:
    """Accumulate observed ranges over calibration batches (pure; jit-able).

    ``"minmax"``: running min of ``lo`` and max of ``hi``. ``"ema"``: the official
    ``running_stat`` rule, ``r = momentum * r + (1 - momentum) * batch`` (the first batch
    initialises ``r``). ``running=None`` starts from ``batch``.
    """
    if method not in ("minmax", "ema"):
        raise ValueError(f"method must be 'minmax' or 'ema', got {method!r}")
    if running is None:
        return dict(batch)
    if set(running) != set(batch):
        diff = sorted(set(running) ^ set(batch))
        raise ValueError(f"update_ranges: layer sets differ: {diff[:20]}")
    if method == "minmax":
        return {name: union_ranges(running[name], new) for name, new in batch.items()}
    return {name: momentum * running[name] + (1.0 - momentum) * new for name, new in batch.items()}
