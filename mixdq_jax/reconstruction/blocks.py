"""Reconstruction units (BRECQ's blocks) and capturing a unit's output.

A *unit* is what one reconstruction step optimises: a UNet block (a ``resnets.<i>`` or a
``transformer_blocks.<i>`` module, as Q-Diffusion reconstructs ResBlocks and
BasicTransformerBlocks) with all its quantizable layers, or a single layer that belongs to no
block (``conv_in``, ``time_embedding.*``, ``proj_in``/``proj_out``, down/upsamplers,
``conv_out``), reconstructed alone as BRECQ does for layers outside blocks. Units come in the
order their first layer runs (the layer registry's order).

A unit's output is the ``__call__`` result of the module with the unit's name, captured with
flax's ``capture_intermediates`` while the whole model runs. The unit's *input* is not
captured: each optimisation step runs the model up to the unit under the current (quantized)
configuration, which is BRECQ's choice of inputs from the quantized model, and ``jit``
removes everything after the unit (the loss does not depend on it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax

from mixdq_jax.quant.intercept import Mode, intercept

Array = jax.Array
Apply = Callable[..., Any]
"""``apply(params, batch, **flax_apply_kwargs) -> output``: one model evaluation."""

BLOCK_PATTERN = re.compile(r"^(.+\.(?:resnets|transformer_blocks)\.\d+)\.")


@dataclass(frozen=True, kw_only=True)
class Unit:
    """One reconstruction unit: the module ``name`` whose output is matched, and its layers."""

    name: str
    layers: tuple[str, ...]


def find_units(layers: Sequence[str], pattern: re.Pattern[str] = BLOCK_PATTERN) -> tuple[Unit, ...]:
    """Units of ``layers`` (in call order): a block for every distinct ``pattern`` match
    (group 1 is the block's module name), a single-layer unit for every other layer."""
    order: list[str] = []
    members: dict[str, list[str]] = {}
    for name in layers:
        match = pattern.match(name)
        unit = match.group(1) if match else name
        if unit not in members:
            order.append(unit)
            members[unit] = []
        members[unit].append(name)
    return tuple(Unit(name=u, layers=tuple(members[u])) for u in order)


def unet_apply(unet: Any) -> Apply:
    """The UNet as an :data:`Apply` on a batch ``{"sample", "t", "context", "added",
    "timestep_cond"}`` (the arguments of `mixdq_jax.quant.forward`)."""

    def apply(params: Any, batch: Mapping[str, Any], **kwargs: Any) -> Any:
        return unet.apply(
            {"params": params},
            batch["sample"],
            batch["t"],
            batch["context"],
            added_cond_kwargs=batch.get("added"),
            timestep_cond=batch.get("timestep_cond"),
            **kwargs,
        )

    return apply


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if key == "__call__":
            out[prefix] = value
        elif isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


class _Captured(Exception):  # noqa: N818 - control flow, not an error
    """Raised inside the model once every wanted output is in: the rest is never traced."""

    def __init__(self, found: dict[str, Any]) -> None:
        super().__init__("captured")
        self.found = found


def capture(
    apply: Apply,
    params: Any,
    batch: Mapping[str, Any],
    names: Sequence[str],
    *,
    mode: Mode | None = None,
    qconfig: Any = None,
    stop_early: bool = False,
) -> dict[str, Array]:
    """The outputs of the modules ``names`` (a module called twice: its outputs concatenated
    on axis 0) with the layers running ``mode`` (``None``: float, no interception).

    ``stop_early``: stop the model at the first module that returns after every wanted
    module has returned once (each is called once, as a UNet block is): what follows is
    never traced, so a program that needs an early block's output compiles only the model
    up to it.
    """
    wanted = frozenset(names)
    seen: dict[str, Any] = {}

    def keep(module: Any, method: str) -> bool:
        if stop_early and len(seen) == len(wanted):
            found = {n: m.get_variable("intermediates", "__call__") for n, m in seen.items()}
            raise _Captured(found)
        name = ".".join(module.path)
        if method != "__call__" or name not in wanted:
            return False
        seen[name] = module
        return True

    def run() -> dict[str, Any]:
        try:
            _, state = apply(params, batch, capture_intermediates=keep, mutable=["intermediates"])
        except _Captured as done:
            return done.found
        return _flatten(state.get("intermediates", {}))

    if mode is None:
        found = run()
    else:
        with intercept(mode, qconfig, check_coverage=not stop_early):
            found = run()
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"capture: module(s) never called: {missing[:10]}")
    return {
        n: found[n][0] if len(found[n]) == 1 else jax.numpy.concatenate(found[n]) for n in names
    }
