"""The learned-rounding mode of the interceptor and the data it runs on.

:class:`LearnedRounding` is one more `mixdq_jax.quant.Mode`: the layers under reconstruction
run AdaRound weights (soft or hard) and, where their activations are quantized, LSQ step
sizes; every other layer of the configuration is plain fake quantization (`FakeQuant`). What
it learns is data: :class:`Rounding` (the configuration, the rounding variables and the step
sizes) is the ``qconfig`` argument ``forward`` passes through, so one compiled program serves
every value of them, and the bits stay traced as everywhere else.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from mixdq_jax.quant.intercept import LayerCall, Mode, Records
from mixdq_jax.quant.modes import FakeQuant
from mixdq_jax.quant.qconfig import QConfig, input_parts
from mixdq_jax.quant.quantizers import quantize_activation, quantize_weight
from mixdq_jax.reconstruction.adaround import rounded_kernel
from mixdq_jax.reconstruction.lsq import lsq_fake_quant

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class Rounding:
    """The learned-rounding mode's data.

    ``v``: AdaRound variables of the layers being learned (the kernel's shape);
    ``a_step`` / ``a_zero``: LSQ step sizes and their fixed zero points (``[parts]``) of the
    layers whose activation steps are learned; ``soft``: 1 for ``h(V)``, 0 for hard rounding.
    """

    qconfig: QConfig
    v: dict[str, Array] = field(default_factory=dict)
    a_step: dict[str, Array] = field(default_factory=dict)
    a_zero: dict[str, Array] = field(default_factory=dict)
    soft: Array = field(default_factory=lambda: jnp.float32(1.0))


@dataclass(frozen=True, kw_only=True)
class LearnedRounding(Mode):
    """Fake quantization with learned rounding and step sizes where ``Rounding`` has them."""

    def layers(self, qconfig: Rounding) -> Collection[str]:
        return qconfig.qconfig.layers

    def handle(self, call: LayerCall, qconfig: Rounding, records: Records) -> Array:
        state, name = qconfig, call.name
        if name not in state.v and name not in state.a_step:
            return FakeQuant().handle(call, state.qconfig, records)
        lq = state.qconfig.layers[name]
        params = call.params
        kernel = params["kernel"]
        fmt = state.qconfig.weight_format
        if name in state.v:
            kernel = rounded_kernel(
                kernel, state.v[name], lq.w_bits, fmt=fmt, split=lq.split, soft=state.soft > 0.5
            )
        else:  # learned steps only: the weights nearest-rounded, as FakeQuant rounds them
            parts = input_parts(lq.split, kernel.shape[-2])
            qs = [quantize_weight(kernel[..., a:b, :], lq.w_bits, fmt=fmt) for a, b in parts]
            kernel = qs[0] if len(qs) == 1 else jnp.concatenate(qs, axis=-2)
        out = call.apply({**params, "kernel": kernel}, _input(call.x, state, name))
        if lq.bos:  # the BOS row from the float layer, as FakeQuant does
            row0 = call.apply(params, call.x)[..., :1, :]
            out = jnp.concatenate([row0, out[..., 1:, :]], axis=-2)
        return out


def _input(x: Array, state: Rounding, name: str) -> Array:
    lq = state.qconfig.layers[name]
    fmt = state.qconfig.act_format
    parts = input_parts(lq.split, x.shape[-1])
    if name in state.a_step:
        if fmt != "int":
            raise ValueError(f"layer {name!r}: learned step sizes need integer activations")
        step, zero = state.a_step[name], state.a_zero[name]
        qs = [
            lsq_fake_quant(x[..., a:b], step[j], zero[j], lq.a_bits)
            for j, (a, b) in enumerate(parts)
        ]
    else:
        qs = [
            quantize_activation(x[..., a:b], lq.a_bits, lq.a_range[j, 0], lq.a_range[j, 1], fmt=fmt)
            for j, (a, b) in enumerate(parts)
        ]
    return qs[0] if len(qs) == 1 else jnp.concatenate(qs, axis=-1)
