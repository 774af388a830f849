"""Reconstruction units (BRECQ's blocks) and capturing a unit's output.

A *unit* is what one reconstruction step optimises: a UNet block (a ``resnets.<i>`` or a
``transformer_blocks.<i>`` module, as Q-Diffusion reconstructs ResBlocks and
BasicTransformerBlocks) with all its quantizable layers, or a single layer that belongs to no
block (``conv_in``, ``time_embedding.*``, ``proj_in``/``proj_out``, down/upsamplers,
``conv_out``), reconstructed alone as BRECQ does for layers outside blocks. Units come in the
order their first layer runs (the layer registry's order).

A unit's output is the ``__call__`` result of the module with the unit's name, captured with
flax's ``capture_intermediates`` while the whole model runs (`capture`). A unit's *inputs*
(`unit_inputs`: the arguments of that call, on every calibration sample) are captured once
per unit from the model quantized so far (BRECQ's choice of inputs), and every optimisation
step then runs the unit alone on them (`UnitCall.run`): a step costs one block, not the
model up to the block (the depth of the UNet times cheaper for the last blocks).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from mixdq_jax.deploy.packed import node_at
from mixdq_jax.quant.intercept import Mode, ModuleReached, intercept
from mixdq_jax.quant.modes import Float

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


@dataclass(frozen=True, eq=False)
class UnitCall:
    """How a unit is called: its module (unbound), and its call's arguments with the arrays
    taken out (``treedef`` over ``(args, kwargs)``; ``static``: the other leaves by index)."""

    name: str
    module: nn.Module
    treedef: Any
    static: tuple[tuple[int, Any], ...]

    def arguments(self, arrays: Sequence[Array]) -> tuple[tuple, dict]:
        leaves, it, fixed = [], iter(arrays), dict(self.static)
        for i in range(self.treedef.num_leaves):
            leaves.append(fixed[i] if i in fixed else next(it))
        return jax.tree.unflatten(self.treedef, leaves)

    def run(
        self,
        params: Any,
        arrays: Sequence[Array],
        *,
        mode: Mode | None = None,
        qconfig: Any = None,
        layers: Sequence[str] = (),
    ) -> dict[str, Array]:
        """The unit alone on ``arrays`` (`unit_inputs`) with the whole model's ``params``:
        its output (key: the unit's name) and the outputs of ``layers`` inside it."""
        args, kwargs = self.arguments(arrays)
        inner = {n[len(self.name) + 1 :]: n for n in layers}

        def keep(module: Any, method: str) -> bool:
            return method == "__call__" and ".".join(module.path) in inner

        ctx = (
            contextlib.nullcontext()
            if mode is None
            else intercept(mode, qconfig, check_coverage=False, prefix=self.name)
        )
        with ctx:
            out, state = self.module.apply(
                {"params": node_at(params, self.name)}, *args, capture_intermediates=keep,
                mutable=["intermediates"], **kwargs,
            )  # fmt: skip
        found = _flatten(state.get("intermediates", {}))
        return {self.name: out, **{full: found[rel][0] for rel, full in inner.items()}}


@lru_cache(maxsize=8)
def _inputs_program(apply: Apply, name: str, mode: Mode) -> Any:
    found: dict[str, Any] = {}

    def run(params: Any, qconfig: Any, batch: Mapping[str, Any]) -> list[Array]:
        try:
            with intercept(mode, qconfig, check_coverage=False, stop_at=name):
                apply(params, batch)
        except ModuleReached as reached:
            leaves, treedef = jax.tree.flatten((reached.args, reached.kwargs))
            static = tuple((i, x) for i, x in enumerate(leaves) if not isinstance(x, jax.Array))
            found["call"] = UnitCall(name=name, module=reached.module, treedef=treedef,
                                     static=static)  # fmt: skip
            return [leaf for leaf in leaves if isinstance(leaf, jax.Array)]
        raise ValueError(f"unit {name!r}: its module was never called")

    return jax.jit(run), found


def unit_inputs(
    apply: Apply,
    params: Any,
    data: Any,
    name: str,
    batch_size: int,
    *,
    mode: Mode | None = None,
    qconfig: Any = None,
) -> tuple[UnitCall, list[np.ndarray]]:
    """The arguments of module ``name``'s call on every sample of ``data`` (a leading sample
    axis), the model run up to it in batches with its layers in ``mode`` (``None``: float):
    the call's structure and its arrays, each with the leading sample axis."""
    program, found = _inputs_program(apply, name, Float() if mode is None else mode)
    n = {int(np.shape(a)[0]) for a in jax.tree.leaves(data)}.pop()
    chunks = []
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        batch = jax.tree.map(lambda a, idx=idx: a[idx], data)
        arrays = program(params, qconfig, batch)
        for a in arrays:
            if a.ndim == 0 or a.shape[0] != len(idx):
                raise ValueError(
                    f"unit {name!r}: an input of shape {a.shape} has no sample axis of "
                    f"{len(idx)}; it cannot be reconstructed alone"
                )
        chunks.append([np.asarray(a) for a in arrays])
    return found["call"], [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
