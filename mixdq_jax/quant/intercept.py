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

NNX (``flax.nnx``) models: ``nnx.Linear`` / ``nnx.Conv`` are not linen modules, so the same
context also routes their ``__call__`` to the mode (the classes' ``__call__`` is swapped for a
router only while a context is open anywhere, and routes only on the thread that opened it).
An NNX module does not know its path, so the model being applied is named first:
``with name_nnx_layers(model): model(x)`` (layer name = the NNX graph path joined with
``"."``, e.g. ``blocks.0.attn.query``); `mixdq_jax.any_model.nnx_apply` does this for you.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

NNX_LAYERS: tuple[type, ...] = (nnx.Linear, nnx.Conv)
"""The NNX layer classes routed to a mode (their linen counterparts: ``nn.Dense``, ``nn.Conv``)."""


@dataclass(frozen=True)
class LayerCall:
    """One intercepted Dense/Conv call (linen ``nn.Dense``/``nn.Conv`` or NNX
    ``nnx.Linear``/``nnx.Conv``; kernels in the same layout: ``(in, out)`` and HWIO)."""

    name: str
    kind: str  # "linear" | "conv"
    module: nn.Module | nnx.Module
    x: Array
    original: Callable[[], Array]  # the call as the model wrote it

    @property
    def params(self) -> dict[str, Any]:
        """The layer's parameters (``kernel``/``bias``, or a packed node when deployed)."""
        if isinstance(self.module, nnx.Module):
            return dict(nnx.to_pure_dict(nnx.state(self.module, nnx.Param)))
        return dict(self.module.variables["params"])

    def apply(self, params: dict[str, Any], x: Array) -> Array:
        """The layer's own Flax math on parameters and input of our choosing."""
        if isinstance(self.module, nnx.Module):  # a copy of the layer holding ``params``
            graphdef, _, rest = nnx.split(self.module, nnx.Param, ...)
            return nnx.merge(graphdef, dict(params), rest)(x)
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
    module of that name is called (its inputs, computed by the model up to it in ``mode``;
    linen modules only). NNX layers are handled too when their model is named
    (:func:`name_nnx_layers`).
    """
    if not isinstance(mode, Mode):
        raise ValueError(f"mode must be a mixdq_jax.quant.Mode instance, got {mode!r}")
    wanted = mode.layers(qconfig)
    wanted = None if wanted is None else frozenset(wanted)
    records = Records()
    handling: list[str] = []  # the layer a mode is handling: its own math is not a layer call

    def layer(name, kind, module, next_fun, args, kwargs):
        if wanted is not None and name not in wanted:
            return next_fun(*args, **kwargs)
        if len(args) != 1 or kwargs:
            raise TypeError(f"layer {name!r}: expected a single positional input")
        records.seen.add(name)
        call = LayerCall(
            name=name,
            kind=kind,
            module=module,
            x=args[0],
            original=lambda: next_fun(*args, **kwargs),
        )
        handling.append(name)
        try:
            return mode.handle(call, qconfig, records)
        finally:
            handling.pop()

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
        kind = "linear" if isinstance(module, nn.Dense) else "conv"
        return layer(name, kind, module, next_fun, args, kwargs)

    def nnx_interceptor(module, next_fun, args, kwargs):
        if handling:  # `LayerCall.apply` inside a mode: a copy of the layer being handled
            return next_fun(*args, **kwargs)
        path = _nnx_name(module)
        name = f"{prefix}.{path}" if prefix else path
        kind = "linear" if isinstance(module, nnx.Linear) else "conv"
        return layer(name, kind, module, next_fun, args, kwargs)

    with nn.intercept_methods(interceptor), _nnx_routing(nnx_interceptor):
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


# --- NNX routing ---------------------------------------------------------------------------
# Linen calls every method of a module through its interceptor stack; NNX has no such hook.
# So while any `intercept` block is open, `nnx.Linear` / `nnx.Conv` ``__call__`` is a router
# that hands the call to this thread's open blocks (innermost first, as linen orders its
# interceptors) and calls the layer as written when the thread has none.


class _NnxThread(threading.local):
    """This thread's open blocks' NNX interceptors and the names of the NNX layers."""

    def __init__(self) -> None:
        self.interceptors: list[Callable[..., Array]] = []
        self.names: list[dict[int, str]] = []


_NNX = _NnxThread()
_ROUTING_LOCK = threading.Lock()
_routing_blocks = 0  # open blocks, all threads
_original_calls: dict[type, Callable[..., Array]] = {}


def _router(original: Callable[..., Array]) -> Callable[..., Array]:
    @functools.wraps(original)
    def __call__(self, *args, **kwargs):  # noqa: N807 - it replaces the layer's __call__
        fun = functools.partial(original, self)
        for interceptor in _NNX.interceptors:
            fun = functools.partial(_nnx_hop, interceptor, self, fun)
        return fun(*args, **kwargs)

    return __call__


def _nnx_hop(interceptor, module, next_fun, *args, **kwargs):
    return interceptor(module, next_fun, args, kwargs)


@contextlib.contextmanager
def _nnx_routing(interceptor: Callable[..., Array]) -> Iterator[None]:
    global _routing_blocks
    with _ROUTING_LOCK:
        if _routing_blocks == 0:
            for cls in NNX_LAYERS:
                _original_calls[cls] = cls.__dict__["__call__"]
                cls.__call__ = _router(_original_calls[cls])
        _routing_blocks += 1
    _NNX.interceptors.append(interceptor)
    try:
        yield
    finally:
        _NNX.interceptors.pop()
        with _ROUTING_LOCK:
            _routing_blocks -= 1
            if _routing_blocks == 0:
                for cls, original in _original_calls.items():
                    cls.__call__ = original
                _original_calls.clear()


def _nnx_name(module: nnx.Module) -> str:
    for names in reversed(_NNX.names):
        name = names.get(id(module))
        if name is not None:
            return name
    raise TypeError(
        f"an NNX {type(module).__name__} was called inside intercept() but its model was not "
        "named: apply NNX models through mixdq_jax.any_model.nnx_apply, or call the model inside "
        "`with name_nnx_layers(model):`"
    )


@contextlib.contextmanager
def name_nnx_layers(model: nnx.Module) -> Iterator[dict[str, nnx.Module]]:
    """Name the ``nnx.Linear`` / ``nnx.Conv`` layers of ``model`` for :func:`intercept` while
    the block is open: the graph path joined with ``"."`` (``blocks.0.attn.query``).

    Why: an NNX module holds no path, and the interceptor must key the configuration by
    name. Yields ``{name: layer}``. A layer shared at two paths has one name (NNX's first).
    """
    layers = {
        ".".join(str(p) for p in path): m
        for path, m in nnx.iter_modules(model)
        if isinstance(m, NNX_LAYERS)
    }
    _NNX.names.append({id(m): name for name, m in layers.items()})
    try:
        yield layers
    finally:
        _NNX.names.pop()
