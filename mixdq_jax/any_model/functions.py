"""A Flax model as the pure function the core takes, and its fake-quantized form.

The core needs only ``apply(params, *inputs) -> output``. Linen works as written,
``lambda params, *x: module.apply({"params": params}, *x)``: the one interceptor sees every
``nn.Dense`` and ``nn.Conv``. An NNX model goes through :func:`nnx_apply`, which splits it
once and merges it inside every call, naming its layers for the interceptor (an NNX module
does not know its path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from mixdq_jax.quant.intercept import intercept, name_nnx_layers
from mixdq_jax.quant.modes import FakeQuant

ApplyFn = Callable[..., Any]
"""``apply(params, *inputs) -> output``, a pure function of a Flax model."""

QuantizedApply = Callable[..., Any]
"""``quantized_apply(params, qconfig, *inputs) -> output``."""


def nnx_apply(model: nnx.Module) -> tuple[ApplyFn, nnx.State]:
    """``(apply, state)`` of an NNX model: ``apply(state, *inputs)`` merges the model from
    ``state`` (a pytree: pass it through ``jit`` and ``vmap`` like linen params) and calls it
    with its ``nnx.Linear`` / ``nnx.Conv`` layers named by graph path (``blocks.0.attn.query``).
    """
    graphdef, state = nnx.split(model)

    def apply(state: nnx.State, *inputs: Any) -> Any:
        module = nnx.merge(graphdef, state)
        with name_nnx_layers(module):
            return module(*inputs)

    return apply, state


def fake_quantized(apply: ApplyFn) -> QuantizedApply:
    """``quantized_apply(params, qconfig, *inputs)``: ``apply`` with every layer of
    ``qconfig`` fake-quantized (weights per output channel, inputs per tensor on their
    calibrated ranges); layers absent from ``qconfig`` run as written.

    Bits and ranges are arrays of ``qconfig``, so ``jax.jit(quantized_apply)`` compiles once
    for every configuration of the same layer set, and ``jax.vmap`` over a stacked
    configuration (`mixdq_jax.quant.stack_qconfigs`) batches many.
    """

    def quantized_apply(params: Any, qconfig: Any, *inputs: Any) -> Any:
        with intercept(FakeQuant(), qconfig):
            return apply(params, *inputs)

    return quantized_apply
