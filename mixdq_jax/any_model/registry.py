"""The quantizable layers of any Flax model: every linen ``nn.Dense`` / ``nn.Conv`` and NNX
``nnx.Linear`` / ``nnx.Conv`` its apply function calls, in call order.

Built by tracing the apply function once with ``jax.eval_shape`` in a recording mode of the
one interceptor: no FLOPs, no weights touched. Sizes are per sample: the inputs' leading axis
is taken as the batch axis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from mixdq_jax.any_model.functions import ApplyFn
from mixdq_jax.quant.intercept import LayerCall, Mode, Records, intercept
from mixdq_jax.quant.qconfig import QConfig, QuantSpec
from mixdq_jax.quant.registry import LayerInfo

GROUPS: tuple[str, ...] = ("content", "quality")

Array = jax.Array


@dataclass(frozen=True, kw_only=True)
class RecordLayers(Mode):
    """Record each layer's kind, input shape (batch axis dropped), kernel shape and bias size;
    the layers run as written."""

    collects = True

    def handle(self, call: LayerCall, qconfig: Any, records: Records) -> Array:
        params = call.params
        bias = params.get("bias")
        entry = (
            call.kind,
            tuple(call.x.shape[1:]),
            tuple(params["kernel"].shape),
            0 if bias is None else int(np.prod(bias.shape)),
        )
        records.add(call.name, entry, lambda old, new: old)
        return call.original()


def model_layers(
    apply: ApplyFn,
    params: Any,
    *inputs: Any,
    group: Callable[[str], str] | None = None,
) -> tuple[LayerInfo, ...]:
    """The quantizable layers ``apply(params, *inputs)`` calls (``params`` and ``inputs`` may be
    ``jax.ShapeDtypeStruct``).

    ``group``: layer name -> ``"content"`` or ``"quality"``, MixDQ's metric-decoupled groups
    (each judged by its own metric and given its own share of the bit budget); by default
    every layer is ``"quality"``.
    """
    seen: dict[str, tuple] = {}

    def run(params: Any, *inputs: Any) -> Any:
        with intercept(RecordLayers()) as records:
            out = apply(params, *inputs)
        seen.update(records.data)
        return out

    jax.eval_shape(run, params, *inputs)
    if not seen:
        raise ValueError(
            "the model called no quantizable layer (linen nn.Dense/nn.Conv or NNX "
            "nnx.Linear/nnx.Conv)"
        )
    layers = []
    for name, (kind, in_shape, kernel, bias) in seen.items():
        g = "quality" if group is None else group(name)
        if g not in GROUPS:
            raise ValueError(f"group({name!r}) returned {g!r}; expected one of {GROUPS}")
        layers.append(
            LayerInfo(
                name=name,
                kind=kind,
                group=g,
                weight_shape=kernel,
                weight_params=int(np.prod(kernel)),
                bias_params=bias,
                input_shape=in_shape,
                input_size=int(np.prod(in_shape)),
            )
        )
    return tuple(layers)


def float_qconfig(layers: Sequence[LayerInfo], ranges: Mapping[str, Any] | None = None) -> QConfig:
    """Every layer at float bits (with its calibrated input range when given): the base that
    calibration observes and the sweep varies. No UNet rules: no BOS rows, no split inputs."""
    spec = QuantSpec(bos_aware=False, shortcut_split=False)
    return spec.to_qconfig([layer.name for layer in layers], ranges)
