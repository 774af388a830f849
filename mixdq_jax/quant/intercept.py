"""The one interceptor: what happens at every quantizable layer is decided by a *mode*.

Every ``nn.Dense`` / ``nn.Conv`` ``__call__`` of a Flax model applied inside
:func:`intercept` becomes a :class:`LayerCall` (layer name = ``".".join(module.path)``, the
diffusers PyTorch module name in our models) handed to the mode's ``handle``. A mode is a small
frozen dataclass; the modes of the library are fake quantization and range observation
(`mixdq_jax.quant.modes`), the deployed integer path (`mixdq_jax.deploy.layers.Deployed`),
shape recording (the layer registry) and feature collection (orthogonality). Adding one
(learned rounding is next) means writing one subclass of :class:`Mode`; this module never
changes and model code never changes.

Enter the context *inside* the function you jit, with the configuration as an argument:
entered outside ``jit``, the interceptor would only run while tracing and a cached program
would silently ignore a new configuration. The context checks on exit that every layer the
mode expects was called, which catches that mistake and any layer-name mismatch.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


@dataclass(frozen=True)
class LayerCall:
    """One intercepted Dense/Conv call."""

    name: str
    kind: str  # "linear" | "conv"
    module: nn.Module
    x: Array
    original: Callable[[], Array]  # the call as the model wrote it

    @property
    def params(self) -> dict[str, Any]:
        """The layer's parameters (``kernel``/``bias``, or a packed node when deployed)."""
        return dict(self.module.variables["params"])

    def apply(self, params: dict[str, Any], x: Array) -> Array:
        """The layer's own Flax math on parameters and input of our choosing."""
        return self.module.clone(parent=None).apply({"params": params}, x)


@dataclass
class Records:
    """What one :func:`intercept` block saw: the layers called and what the mode recorded
    (arrays; tracers inside ``jit``)."""

    seen: set[str] = field(default_factory=set)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: Any, combine: Callable[[Any, Any], Any]) -> None:
        """Record ``value`` for ``name``; a layer called twice combines the two."""
        self.data[name] = combine(self.data[name], value) if name in self.data else value


def union_ranges(old: Array, new: Array) -> Array:
    """Elementwise union of ``[..., 2]`` ``(lo, hi)`` ranges."""
    return jnp.stack(
        [jnp.minimum(old[..., 0], new[..., 0]), jnp.maximum(old[..., 1], new[..., 1])], axis=-1
    )


class Mode(abc.ABC):
    """What happens at a quantizable layer. Subclass as a frozen keyword-only dataclass.

    ``collects``: the mode records data per layer (``forward`` then returns it).
    ``on_init``: the mode also runs while the model initialises (shape recording).
    """

    collects: ClassVar[bool] = False
    on_init: ClassVar[bool] = False

    def layers(self, qconfig: Any) -> Collection[str] | None:
        """Names of the layers this mode handles (``None``: every Dense/Conv); those are
        also the layers that must be called (coverage check)."""
        return None

    @abc.abstractmethod
    def handle(self, call: LayerCall, qconfig: Any, records: Records) -> Array:
        """The layer's output (``call.original()`` for the model as written)."""


class ModuleReached(Exception):  # noqa: N818 - control flow, not an error
    """Raised inside the model by ``intercept(..., stop_at=NAME)`` when module ``NAME`` is
    called, before it runs: the module (unbound: ``module.apply`` runs it alone) and the
    call's arguments."""

    def __init__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super().__init__(f"module {'.'.join(module.path) or module.name} reached")
        self.module, self.args, self.kwargs = module.clone(parent=None), args, kwargs


@contextlib.contextmanager
def intercept(
    mode: Mode,
    qconfig: Any = None,
    *,
    check_coverage: bool = True,
    prefix: str = "",
    stop_at: str | None = None,
) -> Iterator[Records]:
    """Run ``mode`` at every quantizable layer of the Flax model applied inside the block.

    ``check_coverage``: on exit, raise ``ValueError`` naming the layers the mode expects that
    were never called. ``prefix``: the model applied is the submodule of that name (one
    UNet block run alone, as reconstruction does), so its layers are named
    ``prefix.<path>`` as in the whole model. ``stop_at``: raise `ModuleReached` when the
    module of that name is called (its inputs, computed by the model up to it in ``mode``).
    """
    if not isinstance(mode, Mode):
        raise ValueError(f"mode must be a mixdq_jax.quant.Mode instance, got {mode!r}")
    wanted = mode.layers(qconfig)
    wanted = None if wanted is None else frozenset(wanted)
    records = Records()
    handling: list[str] = []  # the layer a mode is handling: its own math is not a layer call

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            stop_at is not None
            and not handling
            and context.method_name == "__call__"
            and ".".join((prefix, *module.path) if prefix else module.path) == stop_at
        ):
            raise ModuleReached(module, args, kwargs)
        if context.method_name != "__call__" or not isinstance(module, nn.Dense | nn.Conv):
            return next_fun(*args, **kwargs)
        if handling:  # `LayerCall.apply` inside a mode: a clone of the layer being handled
            return next_fun(*args, **kwargs)
        if module.is_initializing() and not mode.on_init:
            return next_fun(*args, **kwargs)
        name = ".".join((prefix, *module.path) if prefix else module.path)
        if wanted is not None and name not in wanted:
            return next_fun(*args, **kwargs)
        if len(args) != 1 or kwargs:
            raise TypeError(f"layer {name!r}: expected a single positional input")
        records.seen.add(name)
        call = LayerCall(
            name=name,
            kind="linear" if isinstance(module, nn.Dense) else "conv",
            module=module,
            x=args[0],
            original=lambda: next_fun(*args, **kwargs),
        )
        handling.append(name)
        try:
            return mode.handle(call, qconfig, records)
        finally:
            handling.pop()

    with nn.intercept_methods(interceptor):
        yield records
    if check_coverage and wanted is not None:
        missed = sorted(wanted - records.seen)
        if missed:
            shown = ", ".join(repr(n) for n in missed[:20])
            more = f" (and {len(missed) - 20} more)" if len(missed) > 20 else ""
            raise ValueError(
                f"{type(mode).__name__} mode: layer(s) never called: {shown}{more}. Check the "
                "module names, or enter the context inside the jitted function."
            )
