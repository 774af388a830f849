"""Apply a ``QConfig`` to a Flax model from the outside, with ``nn.intercept_methods``.

Every ``nn.Dense`` / ``nn.Conv`` call is intercepted; the layer name is
``".".join(module.path)`` (our models name modules like the diffusers PyTorch modules). For a
layer in the config the input activation is fake-quantized per tensor and the kernel per output
channel, and the layer's own Flax code runs on them (an unbound clone applied to the
quantized kernel), so float settings reproduce the float model bit for bit. Other layers run
untouched. Model code needs no change.

Use the context *inside* the function you jit, with the config as an argument::

    @jax.jit
    def forward(params, qconfig, x):
        with fake_quant_context(qconfig):
            return model.apply(params, x)

Entered outside ``jit``, the interceptor would only run while tracing and a cached program
would silently ignore a new config; the context checks on exit that every configured layer
was called, which also catches that mistake and any layer-name mismatch.

Observe mode (calibration) runs activations in float, weights as configured, and records
per-layer input ranges that include 0: ``[lo, hi]``; ``[[lo1, hi1], [lo2, hi2]]`` for split
layers (one range per input half); token 0 excluded for BOS-aware layers. Stats are returned
as arrays (``recorder.stats``), so observation works under ``jit``; accumulate batches with
``update_ranges``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import flax.linen as nn
import jax
import jax.numpy as jnp

from mixdq_jax.quant.qconfig import LayerQConfig, QConfig
from mixdq_jax.quant.quantizers import quantize_activation, quantize_weight

Array = jax.Array
MODES = ("quant", "observe")


@dataclass
class Recorder:
    """What one ``fake_quant_context`` saw: the layers called and, in observe mode, the
    per-layer activation ranges of this forward (arrays; tracers inside ``jit``)."""

    mode: str
    seen: set[str] = field(default_factory=set)
    stats: dict[str, Array] = field(default_factory=dict)

    def _record(self, name: str, rng: Array) -> None:
        if name in self.stats:  # a layer called twice in one forward: union of the ranges
            old = self.stats[name]
            rng = jnp.stack(
                [jnp.minimum(old[..., 0], rng[..., 0]), jnp.maximum(old[..., 1], rng[..., 1])],
                axis=-1,
            )
        self.stats[name] = rng


def _minmax(x: Array) -> Array:
    xf = x.astype(jnp.float32)
    return jnp.stack([jnp.minimum(jnp.min(xf), 0.0), jnp.maximum(jnp.max(xf), 0.0)])


def _split_weight(kernel: Array, split: int, bits: Array, fmt: str) -> Array:
    """Quantize the two input-channel groups (axis -2 for Dense and Conv) separately."""
    lo = quantize_weight(kernel[..., :split, :], bits, fmt=fmt)
    hi = quantize_weight(kernel[..., split:, :], bits, fmt=fmt)
    return jnp.concatenate([lo, hi], axis=-2)


def _quant_input(x: Array, lq: LayerQConfig, fmt: str) -> Array:
    if lq.split is None:
        return quantize_activation(x, lq.a_bits, lq.a_lo, lq.a_hi, fmt=fmt)
    s = lq.split
    first = quantize_activation(x[..., :s], lq.a_bits, lq.a_lo, lq.a_hi, fmt=fmt)
    second = quantize_activation(x[..., s:], lq.a_bits, lq.a2_lo, lq.a2_hi, fmt=fmt)
    return jnp.concatenate([first, second], axis=-1)


def _observe_input(x: Array, lq: LayerQConfig) -> Array:
    if lq.bos:
        x = x[..., 1:, :]
    if lq.split is None:
        return _minmax(x)
    return jnp.stack([_minmax(x[..., : lq.split]), _minmax(x[..., lq.split :])])


def _check_shapes(name: str, x: Array, kernel: Array, lq: LayerQConfig) -> None:
    if lq.split is not None and not 0 < lq.split < kernel.shape[-2]:
        raise ValueError(
            f"layer {name!r}: split {lq.split} outside its {kernel.shape[-2]} input channels"
        )
    if lq.bos and x.ndim < 3:
        raise ValueError(
            f"layer {name!r}: BOS-aware layer expects (..., tokens, channels) input, got "
            f"shape {x.shape}"
        )


def _make_interceptor(qconfig: QConfig, recorder: Recorder):
    wfmt, afmt = qconfig.weight_format, qconfig.act_format

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return next_fun(*args, **kwargs)
        name = ".".join(module.path)
        lq = qconfig.layers.get(name)
        if lq is None or module.is_initializing():
            return next_fun(*args, **kwargs)
        if len(args) != 1 or kwargs:
            raise TypeError(f"layer {name!r}: expected a single positional input")
        (x,) = args
        params = dict(module.variables["params"])
        kernel = params["kernel"]
        _check_shapes(name, x, kernel, lq)
        recorder.seen.add(name)
        layer = module.clone(parent=None)  # the same Flax math, on variables we choose

        def run(inp: Array, k: Array) -> Array:
            return layer.apply({"params": {**params, "kernel": k}}, inp)

        if lq.split is None:
            wq = quantize_weight(kernel, lq.w_bits, fmt=wfmt)
        else:
            wq = _split_weight(kernel, lq.split, lq.w_bits, wfmt)
        if recorder.mode == "observe":
            recorder._record(name, _observe_input(x, lq))
            xq = x
        else:
            xq = _quant_input(x, lq, afmt)
        out = run(xq, wq)
        if lq.bos:
            # BOS-aware (MixDQ sec. 3.1): the text-embedding BOS token is the same for every
            # prompt, so its output row is precomputed in float; only the others are quantized.
            out = jnp.concatenate([run(x, kernel)[..., :1, :], out[..., 1:, :]], axis=-2)
        return out

    return interceptor


@contextlib.contextmanager
def fake_quant_context(
    qconfig: QConfig, *, mode: str = "quant", check_coverage: bool = True
) -> Iterator[Recorder]:
    """Fake-quantize (``mode="quant"``) or observe activation ranges (``mode="observe"``)
    for every Dense/Conv named in ``qconfig`` while the block runs; yields a ``Recorder``.

    ``check_coverage``: on exit, raise ``ValueError`` naming configured layers that were
    never called (a naming mismatch, or the context entered outside a cached ``jit``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    recorder = Recorder(mode=mode)
    with nn.intercept_methods(_make_interceptor(qconfig, recorder)):
        yield recorder
    if check_coverage:
        missed = sorted(set(qconfig.layers) - recorder.seen)
        if missed:
            shown = ", ".join(repr(n) for n in missed[:20])
            more = f" (and {len(missed) - 20} more)" if len(missed) > 20 else ""
            raise ValueError(
                f"fake_quant_context: configured layer(s) never called: {shown}{more}. "
                "Check the module names, or enter the context inside the jitted function."
            )


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
    out: dict[str, Array] = {}
    for name, new in batch.items():
        old = running[name]
        if method == "minmax":
            out[name] = jnp.stack(
                [jnp.minimum(old[..., 0], new[..., 0]), jnp.maximum(old[..., 1], new[..., 1])],
                axis=-1,
            )
        else:
            out[name] = momentum * old + (1.0 - momentum) * new
    return out
