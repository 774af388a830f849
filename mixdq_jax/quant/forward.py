"""``forward``: one UNet evaluation under a quantization configuration, as a pure function.

This is the spine of the library: the pipeline's sampling loop, calibration, sensitivity
sweeps, orthogonality and the deployed path all call it. The configuration is an argument
(arrays), so ``jax.jit(forward, static_argnums=0)`` compiles once for every configuration of
the same layer set and ``jax.vmap`` over a stacked configuration batches a sweep::

    from mixdq_jax.quant import forward
    out = jax.jit(forward, static_argnums=0)(unet, params, qconfig, sample, t, cond)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from mixdq_jax.quant.intercept import Mode, intercept
from mixdq_jax.quant.modes import Float, default_mode

Array = jax.Array


def forward(
    unet: Any,
    params: Any,
    qconfig: Any,
    sample: Array,
    t: Array,
    cond: Mapping[str, Any],
    *,
    mode: Mode | None = None,
) -> Any:
    """The UNet output for ``sample`` at timestep ``t`` under ``qconfig``.

    ``unet``: the Flax ``UNet2DConditionModel``; ``params``: its params tree (packed for the
    deployed mode); ``cond``: ``{"context", "added", "timestep_cond"}`` as
    ``Pipeline.conditioning`` builds it. ``mode``: what runs at each quantizable layer; by
    default fake quantization when ``qconfig`` is given and plain float when it is ``None``
    (no interception at all). A collecting mode (``Observe``, ``CollectFeatures``) returns
    ``(output, {layer: recorded})``.
    """
    mode = default_mode(qconfig) if mode is None else mode

    def apply() -> Array:
        return unet.apply(
            {"params": params},
            sample,
            t,
            cond["context"],
            added_cond_kwargs=cond.get("added"),
            timestep_cond=cond.get("timestep_cond"),
        )

    if isinstance(mode, Float):
        return apply()
    with intercept(mode, qconfig) as records:
        out = apply()
    return (out, records.data) if mode.collects else out


def unet_arguments(inputs: Mapping[str, Any]) -> tuple[Array, Array, dict[str, Any]]:
    """``(sample, t, cond)`` for :func:`forward` from UNet keyword arguments (the form of
    `mixdq_jax.models.unet.example_inputs`)."""
    cond = {
        "context": inputs["encoder_hidden_states"],
        "added": inputs.get("added_cond_kwargs"),
        "timestep_cond": inputs.get("timestep_cond"),
    }
    return inputs["sample"], inputs["timesteps"], cond
