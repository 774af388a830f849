"""Per-layer cost tables: what each Dense/Conv of a UNet costs in each per-layer format.

A latency- or size-budgeted search picks one format per layer (`mixdq_jax.quant.layer_formats`:
``float``, ``fp8``, ``w8a8``, ``w4a8``, ``w4a16``, ``w4a4lr``); it needs, for every layer and
format, the measured latency at the shapes the layer runs at, the stored bytes and the BOPs.

- Shapes come from one traced forward (``jax.eval_shape``; no weight is materialised), so
  the full-size SDXL UNet's table needs only its config.json.
- Latency: the layer alone (a standalone ``nn.Dense`` / ``nn.Conv`` of its geometry) through
  the deployed path (`layers.run_layer`) on random packed params of the packed shapes, one
  jitted call, warm-up, the median of ``repeats``; ``float`` runs the Flax layer itself.
  Layers of one signature (format, kind, input and weight shape, bias, geometry, BOS, split)
  are timed once and share the number.
- Bytes: ``tree_nbytes`` of the layer's packed node (`packed.pack_layer` traced), float: the
  kernel and bias at the float dtype.
- BOPs: MACs x `layer_formats.op_bits` (fp8 counts as 8 x 8), plus the low-rank branch
  (``tokens x r x (K + N)`` MACs) at 16 x 16 for ``w4a4lr``. MACs are for the table's batch.

The table resumes: it is rewritten (atomically, layers in call order) after every layer, and
a run given a table made with the same settings measures only what is missing; other settings
are refused.

Schema (``mixdq-layer-costs/1``)::

    {"schema": "mixdq-layer-costs/1",
     "settings": {"model_hash", "batch", "latent": [h, w], "seq_len", "formats": [...],
                  "float_dtype", "kernel_backend", "platform", "device_kind",
                  "rank_fraction", "symmetric_weights"},   # a resumed run must match these
     "device": str, "backend": jax platform, "jax_version": str, "repeats": int,
     "dispatch_ms": float,                               # a jitted no-op call's ms
     "complete": bool,                                   # every layer measured
     "layers": {name: {"kind": "linear" | "conv", "input_shape": [...] (with batch),
                       "weight_shape": [...] (Flax layout), "macs": int,
                       "formats": {fmt: {"ms": float, "bytes": int, "bops": int}},
                       "unsupported": {fmt: why}}},     # only when some format cannot run
     "totals": {fmt: {"ms", "bytes", "bops", "float_fallback": n}},
     "totals_note": str, "seconds": float,              # measuring time over all runs
     "unet": {fmt: {"measured_ms", "predicted_ms", "ratio"}}, "fit": {...}}  # optional

``totals`` are uniform-format sums over the Dense/Conv layers in the table (attention score
products, norms and activations are not in any layer); a layer a format cannot take counts at
its float cost (``float_fallback`` says how many). ``unet`` / ``fit`` are written by
:func:`additivity` checks (``mixdq bench layers --check-additivity``): the measured whole
forward per uniform format against the table's sum, and ``measured ~= a * sum + b``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.deploy.latency import _median_ms, _random_like, forward_ms
from mixdq_jax.deploy.layers import run_layer
from mixdq_jax.deploy.memory import tree_nbytes
from mixdq_jax.deploy.packed import (
    DeployPlan,
    LayerPlan,
    grouped_plan,
    node_at,
    pack_layer,
    packed_shapes,
    storage_bits_for,
)
from mixdq_jax.io_utils import atomic_write_text, read_json_object
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs, param_shapes
from mixdq_jax.quant.intercept import LayerCall, Mode, Records
from mixdq_jax.quant.layer_formats import LAYER_FORMATS, LayerFormat, op_bits, parse_formats
from mixdq_jax.quant.lowrank import LowRank, fraction_rank
from mixdq_jax.quant.modes import conv_geometry
from mixdq_jax.quant.qconfig import FLOAT_BITS, input_parts, is_bos_layer
from mixdq_jax.quant.registry import layer_splits, traced_records, unet_layers

SCHEMA = "mixdq-layer-costs/1"
LOWRANK_GROUP = 64  # SVDQuant's group size
DEFAULT_RANK = 32  # SVDQuant's rank (`methods.format.LowRankSettings`)
TOTALS_NOTE = (
    "uniform-format sums over the Dense/Conv layers in the table (attention products, norms "
    "and activations are in no layer); a layer a format cannot take counts at its float cost "
    "(float_fallback)"
)
Array = jax.Array


# ------------------------------------------------------------------------------ shapes
@dataclass(frozen=True, kw_only=True)
class LayerShape:
    """One Dense/Conv as the traced forward ran it (shapes with the batch axis).
    ``geometry_error``: why the quantized paths cannot run this conv (``None``: they can)."""

    name: str
    kind: str  # "linear" | "conv"
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    use_bias: bool
    strides: tuple[int, ...] = (1, 1)
    padding: Any = "VALID"  # as the module has it (hashable)
    bos: bool = False
    split: int | None = None
    geometry_error: str | None = None

    @property
    def gemm_k(self) -> int:
        return math.prod(self.weight_shape[:-1])

    @property
    def gemm_n(self) -> int:
        return int(self.weight_shape[-1])

    @property
    def tokens(self) -> int:
        """Output positions (GEMM rows) of the whole batch."""
        return math.prod(self.output_shape[:-1])

    @property
    def macs(self) -> int:
        return self.tokens * self.gemm_n * self.gemm_k

    def signature(self, fmt: str) -> tuple:
        """What the timing of ``fmt`` depends on (the name does not)."""
        return (fmt, self.kind, self.input_shape, self.weight_shape, self.use_bias,
                self.strides, self.padding, self.bos, self.split)  # fmt: skip


def _hashable(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return tuple(_hashable(x) for x in v)
    return v


@dataclass(frozen=True, kw_only=True)
class _RecordLayers(Mode):
    """Records each layer's call: input / output / kernel shapes and its geometry."""

    collects = True

    def handle(self, call: LayerCall, qconfig: Any, records: Records) -> Array:
        out = call.original()
        m = call.module
        geo: dict[str, Any] = {}
        if call.kind == "conv":
            strides = m.strides or 1
            geo["strides"] = (strides,) * 2 if isinstance(strides, int) else tuple(strides)
            geo["padding"] = _hashable(m.padding)
            try:
                conv_geometry(m, call.name)
            except ValueError as err:
                geo["geometry_error"] = str(err)
        value = dict(
            kind=call.kind,
            input_shape=tuple(int(d) for d in call.x.shape),
            output_shape=tuple(int(d) for d in out.shape),
            weight_shape=tuple(int(d) for d in call.params["kernel"].shape),
            use_bias="bias" in call.params,
            **geo,
        )
        records.add(call.name, value, lambda old, new: old)
        return out


def _hw(config: UNetConfig, latent: int | tuple[int, int] | None) -> tuple[int, int]:
    if latent is None:
        size = config.sample_size or 64
        return tuple(size) if isinstance(size, tuple) else (size, size)
    return (latent, latent) if isinstance(latent, int) else (int(latent[0]), int(latent[1]))


def layer_shapes(
    config: UNetConfig, *, batch: int = 1, latent: int | tuple[int, int] | None = None,
    seq_len: int = 77,
) -> dict[str, LayerShape]:  # fmt: skip
    """``{layer: LayerShape}`` of every Dense/Conv in call order, from one abstract forward at
    ``batch`` x ``latent`` (side or (h, w); ``None``: the config's sample size)."""
    return dict(_layer_shapes(config, batch, _hw(config, latent), seq_len))


@functools.cache
def _layer_shapes(
    config: UNetConfig, batch: int, hw: tuple[int, int], seq_len: int
) -> dict[str, LayerShape]:
    seen = traced_records(config, _RecordLayers(), batch=batch, hw=hw, seq_len=seq_len)
    splits = layer_splits(unet_layers(config))
    return {
        name: LayerShape(name=name, bos=is_bos_layer(name), split=splits.get(name), **v)
        for name, v in seen.items()
    }


# ------------------------------------------------------------------------------ plans
def layer_rank(weight_shape: tuple[int, ...], rank_fraction: float | None = None) -> int:
    """The low-rank branch's rank of a ``w4a4lr`` layer (`quant.lowrank.fraction_rank` at
    SVDQuant's rank 32), capped at the GEMM's sides."""
    k, n = math.prod(weight_shape[:-1]), int(weight_shape[-1])
    if rank_fraction is not None and not 0.0 < rank_fraction < 1.0:
        raise ValueError(f"rank_fraction {rank_fraction} not in (0, 1)")
    return min(fraction_rank(k, n, DEFAULT_RANK, rank_fraction), k, n)


def format_plan(
    name: str,
    kind: str,
    weight_shape: tuple[int, ...],
    fmt: LayerFormat,
    *,
    symmetric_weights: bool = True,
    bos: bool = False,
    split: int | None = None,
    rank: int = DEFAULT_RANK,
) -> LayerPlan | None:
    """The `LayerPlan` of one layer in one format (``None``: float). ``w4a4lr``: groups of
    64 with smoothing and a rank-``rank`` branch (capped at the matrix); integer formats the
    narrowest storage (`storage_bits_for`); ``fp8`` 8-bit e4m3 storage."""
    shape = tuple(int(d) for d in weight_shape)
    want = "linear" if len(shape) == 2 else "conv"
    if kind != want:
        raise ValueError(f"layer {name!r}: kind {kind!r} does not fit weight shape {shape}")
    if fmt.is_float:
        return None
    if fmt.lowrank:
        lowrank = LowRank.shapes(shape, rank)
        return grouped_plan(name, shape, fmt.w_bits, fmt.a_bits, LOWRANK_GROUP, lowrank, bos)
    ks = [math.prod(shape[:-2]) * (b - a) for a, b in input_parts(split, shape[-2])]
    storage = 8 if fmt.fp8 and fmt.w_bits < FLOAT_BITS else storage_bits_for(fmt.w_bits, ks)
    return LayerPlan(
        name=name, kind=kind, weight_shape=shape, w_bits=fmt.w_bits, a_bits=fmt.a_bits,
        storage_bits=storage, symmetric=symmetric_weights or fmt.fp8, split=split, bos=bos,
        fp8=fmt.fp8,
    )  # fmt: skip


def _formats(formats: str | Iterable[str | LayerFormat]) -> tuple[LayerFormat, ...]:
    """`parse_formats` of names, or of `LayerFormat`s (float always included)."""
    if not isinstance(formats, str):
        formats = [f.name if isinstance(f, LayerFormat) else f for f in formats]
    return parse_formats(formats)


def _format(name: str, what: str) -> LayerFormat:
    if name not in LAYER_FORMATS:
        raise ValueError(f"{what}: unknown format {name!r}; known: {', '.join(LAYER_FORMATS)}")
    return LAYER_FORMATS[name]


def plan_for_formats(
    config: UNetConfig,
    float_shapes: Any,
    assignment: Mapping[str, str],
    *,
    rank_fraction: float | None = None,
    symmetric_weights: bool = True,
) -> DeployPlan:
    """The `DeployPlan` of a mixed model: each layer of ``assignment`` in its format (layers
    it leaves out, and ``float`` ones, stay float). ``float_shapes``: the float params tree
    (arrays or shapes); splits and BOS layers as `QuantSpec` sets them by default."""
    splits = layer_splits(unet_layers(config))
    layers = {}
    for name, fname in assignment.items():
        if name not in splits:
            raise ValueError(f"assignment: layer {name!r} is not a Dense/Conv of this UNet")
        fmt = _format(fname, f"assignment of layer {name!r}")
        shape = tuple(int(d) for d in node_at(float_shapes, name)["kernel"].shape)
        lp = format_plan(
            name, "linear" if len(shape) == 2 else "conv", shape, fmt,
            symmetric_weights=symmetric_weights, bos=is_bos_layer(name), split=splits[name],
            rank=layer_rank(shape, rank_fraction),
        )  # fmt: skip
        if lp is not None:
            layers[name] = lp
    return DeployPlan(layers=layers)


def _placeholder_ranges(plan: DeployPlan) -> dict[str, np.ndarray]:
    """[-1, 1] per input part of layers with calibrated activations (shapes only matter)."""
    return {
        n: np.array([[-1.0, 1.0]] * len(lp.parts()), np.float32)
        for n, lp in plan.layers.items()
        if lp.a_bits < FLOAT_BITS and lp.group is None
    }


# ------------------------------------------------------------------------------ one layer
def _float_node(layer: LayerShape, float_dtype: Any) -> dict[str, jax.ShapeDtypeStruct]:
    node = {"kernel": jax.ShapeDtypeStruct(layer.weight_shape, float_dtype)}
    if layer.use_bias:
        node["bias"] = jax.ShapeDtypeStruct((layer.gemm_n,), float_dtype)
    return node


def layer_packed_shapes(lp: LayerPlan, node: Mapping[str, Any], float_dtype: Any) -> dict:
    """``ShapeDtypeStruct``s of one layer's packed node (the real packer, traced)."""
    f32 = jnp.float32
    act = None
    if lp.a_bits < FLOAT_BITS and lp.group is None:
        act = jax.ShapeDtypeStruct((len(lp.parts()), 2), f32)
    x_bos = None
    if lp.bos and lp.mode != "act_only":
        x_bos = jax.ShapeDtypeStruct((lp.weight_shape[-2],), f32)
    lowrank = LowRank.shapes(lp.weight_shape, max(lp.rank, 1)) if lp.smooth else None
    return jax.eval_shape(
        lambda n, a, xb, lr: pack_layer(n, lp, a, xb, jnp.dtype(float_dtype), lr),
        dict(node), act, x_bos, lowrank,
    )  # fmt: skip


def _plan(layer: LayerShape, fmt: LayerFormat, rank_fraction: float | None) -> LayerPlan | None:
    return format_plan(
        layer.name, layer.kind, layer.weight_shape, fmt, bos=layer.bos, split=layer.split,
        rank=layer_rank(layer.weight_shape, rank_fraction),
    )  # fmt: skip


def layer_bytes(
    layer: LayerShape, fmt: LayerFormat, *, float_dtype: Any, rank_fraction: float | None = None
) -> int:
    """Stored bytes of the layer in ``fmt`` (packed node; float: kernel + bias)."""
    # the input shape and the name change no bytes: one trace per weight signature
    key = replace(layer, name="", input_shape=(), output_shape=())
    return _layer_bytes(key, fmt, jnp.dtype(float_dtype).name, rank_fraction)


@functools.cache
def _layer_bytes(
    layer: LayerShape, fmt: LayerFormat, float_dtype: str, rank_fraction: float | None
) -> int:
    node = _float_node(layer, float_dtype)
    lp = _plan(layer, fmt, rank_fraction)
    return tree_nbytes(node if lp is None else layer_packed_shapes(lp, node, float_dtype))


def layer_bops(layer: LayerShape, fmt: LayerFormat, *, rank_fraction: float | None = None) -> int:
    """MACs x op bits, plus the 16-bit low-rank branch of ``w4a4lr``."""
    bops = layer.macs * op_bits(fmt.w_bits, fmt.a_bits)
    if fmt.lowrank:
        r = layer_rank(layer.weight_shape, rank_fraction)
        bops += layer.tokens * r * (layer.gemm_k + layer.gemm_n) * FLOAT_BITS * FLOAT_BITS
    return int(bops)


def layer_module(layer: LayerShape, float_dtype: Any) -> nn.Module:
    """A standalone Flax layer of the recorded geometry (unbound: ``apply`` runs it)."""
    n, dt = layer.gemm_n, jnp.dtype(float_dtype)
    if layer.kind == "linear":
        return nn.Dense(n, use_bias=layer.use_bias, dtype=dt, param_dtype=dt)
    return nn.Conv(
        n, tuple(layer.weight_shape[:2]), strides=layer.strides, padding=layer.padding,
        use_bias=layer.use_bias, dtype=dt, param_dtype=dt,
    )  # fmt: skip


def time_layer(
    layer: LayerShape,
    fmt: LayerFormat,
    *,
    float_dtype: Any = jnp.float32,
    backend: str = "auto",
    repeats: int = 5,
    rank_fraction: float | None = None,
    seed: int = 0,
) -> float:
    """Median ms of one jitted call of the layer in ``fmt`` (after a warm-up call) on random
    params of its packed shapes and a random input: the deployed path for quantized formats,
    the Flax layer for ``float``."""
    module = layer_module(layer, float_dtype)
    node = _float_node(layer, float_dtype)
    lp = _plan(layer, fmt, rank_fraction)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=layer.input_shape), float_dtype)
    if lp is None:
        params = _random_like(node, seed)
        fn = jax.jit(lambda p, x: module.apply({"params": p}, x))
    else:
        params = _random_like(layer_packed_shapes(lp, node, float_dtype), seed)
        fn = jax.jit(lambda p, x: run_layer(module, lp, p, x, backend))
    return _median_ms(fn, (params, x), repeats)


# ------------------------------------------------------------------------------ the table
def config_hash(config: UNetConfig) -> str:
    """A short digest of the UNet architecture (what makes two tables comparable)."""
    text = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_float_dtype() -> jnp.dtype:
    """float32 on CPU (XLA:CPU computes fp16 in f32), float16 on accelerators."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.float16)


def table_settings(
    config: UNetConfig,
    *,
    formats: str | Iterable[str | LayerFormat],
    batch: int = 1,
    latent: int | tuple[int, int] | None = None,
    seq_len: int = 77,
    float_dtype: Any = None,
    backend: str = "auto",
    rank_fraction: float | None = None,
) -> dict[str, Any]:
    """What a table's numbers depend on (JSON values): a resumed table must match them."""
    float_dtype = default_float_dtype() if float_dtype is None else jnp.dtype(float_dtype)
    settings = {
        "model_hash": config_hash(config), "batch": batch, "latent": list(_hw(config, latent)),
        "seq_len": seq_len, "formats": [f.name for f in _formats(formats)],
        "float_dtype": jnp.dtype(float_dtype).name, "kernel_backend": backend,
        "platform": jax.default_backend(), "device_kind": str(jax.devices()[0].device_kind),
        "rank_fraction": rank_fraction, "symmetric_weights": True,
    }  # fmt: skip
    return json.loads(json.dumps(settings))


def settings_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """The first setting whose value differs, as ``"key = old (this run: new)"``; ``None``
    when a table made with ``old`` can be resumed with ``new``."""
    for key, value in new.items():
        if old.get(key) != value:
            return f"{key} = {old.get(key)!r} (this run: {value!r})"
    return None


def _start(out: Path | None, settings: dict, restart: bool, repeats: int) -> dict:
    """The table to fill: the one at ``out`` when its settings match, else a new one."""
    if out is not None and Path(out).exists() and not restart:
        table = load_costs(out)
        differs = settings_mismatch(table["settings"], settings)
        if differs is not None:
            raise ValueError(
                f"{out}: a cost table made with other settings, {differs}: it cannot be "
                "resumed; pick another --out (or --overwrite to start it afresh)"
            )
        return table
    return {
        "schema": SCHEMA, "settings": settings, "device": settings["device_kind"],
        "backend": jax.default_backend(), "jax_version": jax.__version__, "repeats": repeats,
        "dispatch_ms": round(dispatch_ms(), 4), "complete": False, "layers": {},
        "totals": {}, "totals_note": TOTALS_NOTE, "seconds": 0.0,
    }  # fmt: skip


def dispatch_ms(repeats: int = 50) -> float:
    """Median ms of a jitted call that does nearly nothing: the per-call overhead inside every
    layer's ``ms`` (a whole forward pays it once, not once per layer)."""
    return _median_ms(jax.jit(lambda x: x + 1.0), (jnp.zeros((), jnp.float32),), repeats)


def _layer_entry(layer: LayerShape) -> dict:
    return {
        "kind": layer.kind,
        "input_shape": list(layer.input_shape),
        "weight_shape": list(layer.weight_shape),
        "macs": layer.macs,
        "formats": {},
    }


def totals(layers: Mapping[str, Any], formats: Iterable[str]) -> dict[str, dict]:
    """Uniform-format sums (a layer without the format counts at its float cost)."""
    out = {}
    for f in formats:
        ms, nbytes, bops, fallback = 0.0, 0, 0, 0
        for entry in layers.values():
            cost = entry["formats"].get(f)
            if cost is None:
                cost, fallback = entry["formats"].get("float"), fallback + 1
            if cost is None:
                continue
            ms, nbytes, bops = ms + cost["ms"], nbytes + cost["bytes"], bops + cost["bops"]
        out[f] = {"ms": round(ms, 4), "bytes": int(nbytes), "bops": int(bops),
                  "float_fallback": fallback}  # fmt: skip
    return out


def _measure(
    layer: LayerShape, fmt: LayerFormat, cache: dict, *, float_dtype, backend, repeats,
    rank_fraction,
) -> dict:  # fmt: skip
    key = layer.signature(fmt.name)
    if key not in cache:
        cache[key] = time_layer(
            layer, fmt, float_dtype=float_dtype, backend=backend, repeats=repeats,
            rank_fraction=rank_fraction,
        )  # fmt: skip
    return {
        "ms": round(cache[key], 4),
        "bytes": layer_bytes(layer, fmt, float_dtype=float_dtype, rank_fraction=rank_fraction),
        "bops": layer_bops(layer, fmt, rank_fraction=rank_fraction),
    }


def _missing(layer: LayerShape, entry: dict, fmts: Iterable[LayerFormat]) -> list[LayerFormat]:
    """Formats still to measure; a conv the quantized paths cannot run is marked."""
    todo = []
    for fmt in fmts:
        if fmt.name in entry["formats"] or fmt.name in entry.get("unsupported", {}):
            continue
        if layer.geometry_error and not fmt.is_float:
            entry.setdefault("unsupported", {})[fmt.name] = layer.geometry_error
            continue
        todo.append(fmt)
    return todo


def cost_table(
    config: UNetConfig,
    *,
    formats: str | Iterable[str | LayerFormat] = ("float", "fp8", "w8a8", "w4a8", "w4a16"),
    batch: int = 1,
    latent: int | tuple[int, int] | None = None,
    seq_len: int = 77,
    repeats: int = 5,
    out: Path | None = None,
    float_dtype: Any = None,
    backend: str = "auto",
    rank_fraction: float | None = None,
    layers: Collection[str] | None = None,
    budget_s: float | None = None,
    restart: bool = False,
    progress: bool = True,
) -> dict:
    """The cost table of ``config`` (schema: the module docstring), written to ``out`` after
    every layer. A present ``out`` made with the same settings is resumed (only what is
    missing is measured); other settings are a ValueError naming the first that differs
    (``restart``: start afresh instead). ``layers``: only these (default every Dense/Conv);
    ``budget_s``: start no layer after this many seconds (``complete`` stays false; rerun to
    go on)."""
    from tqdm import tqdm  # noqa: PLC0415

    fmts = _formats(formats)
    float_dtype = default_float_dtype() if float_dtype is None else jnp.dtype(float_dtype)
    hw = _hw(config, latent)
    shapes = layer_shapes(config, batch=batch, latent=hw, seq_len=seq_len)
    if layers is not None:
        unknown = sorted(set(layers) - set(shapes))
        if unknown:
            raise ValueError(f"layers: {unknown[:5]} are not Dense/Conv layers of this UNet")
        shapes = {n: s for n, s in shapes.items() if n in set(layers)}
    settings = table_settings(
        config, formats=formats, batch=batch, latent=hw, seq_len=seq_len,
        float_dtype=float_dtype, backend=backend, rank_fraction=rank_fraction,
    )  # fmt: skip
    table = _start(out, settings, restart, repeats)
    cache = _known_timings(table, shapes)
    kw = dict(float_dtype=float_dtype, backend=backend, repeats=repeats,
              rank_fraction=rank_fraction)  # fmt: skip
    t0 = time.perf_counter()
    done = sum(1 for n in shapes if n in table["layers"] and not _missing(
        shapes[n], table["layers"][n], fmts))  # fmt: skip
    bar = tqdm(total=len(shapes), initial=done, file=sys.stderr, disable=not progress,
               desc="layer costs", unit="layer")  # fmt: skip
    stopped = False
    try:
        for name, layer in shapes.items():
            entry = table["layers"].get(name) or _layer_entry(layer)
            todo = _missing(layer, entry, fmts)
            if not todo and name in table["layers"]:
                continue
            if budget_s is not None and time.perf_counter() - t0 > budget_s:
                stopped = True
                break
            start = time.perf_counter()
            costs = {f.name: _measure(layer, f, cache, **kw) for f in todo}
            merged = {**entry["formats"], **costs}
            entry["formats"] = {f.name: merged[f.name] for f in fmts if f.name in merged}
            table["layers"][name] = entry
            table["seconds"] = round(table["seconds"] + time.perf_counter() - start, 2)
            _finish(table, shapes, fmts, complete=False)
            if out is not None:
                write_table(out, table)
            bar.update(1)
    finally:
        bar.close()
    _finish(table, shapes, fmts, complete=not stopped)
    if out is not None:
        write_table(out, table)
    return table


def write_table(path: str | Path, table: Mapping[str, Any]) -> None:
    """Write atomically, keys in their order (layers in call order: `atomic_write_json`
    would sort them)."""
    atomic_write_text(path, json.dumps(table, indent=1) + "\n")


def _finish(table: dict, shapes: Mapping[str, LayerShape], fmts, *, complete: bool) -> None:
    names = [f.name for f in fmts]
    layers = table["layers"]
    order = [n for n in shapes if n in layers] + [n for n in layers if n not in shapes]
    table["layers"] = {n: layers[n] for n in order}
    table["totals"] = totals(table["layers"], names)
    table["complete"] = complete and all(n in table["layers"] for n in shapes)


def _known_timings(table: dict, shapes: Mapping[str, LayerShape]) -> dict:
    """Timings already in a resumed table, by signature (identical layers reuse them)."""
    cache = {}
    for name, entry in table["layers"].items():
        if name in shapes:
            for fmt, cost in entry["formats"].items():
                cache.setdefault(shapes[name].signature(fmt), float(cost["ms"]))
    return cache


# ------------------------------------------------------------------------------ reading
def load_costs(path: str | Path) -> dict:
    """A cost table, checked: a ValueError naming the file, layer, format and key that is
    wrong (a missing file: FileNotFoundError)."""
    table = read_json_object(path, what="a layer cost table (mixdq bench layers --out)")
    where = str(path)
    if table.get("schema") != SCHEMA:
        raise ValueError(
            f"{where}: not a layer cost table (schema {table.get('schema')!r}, expected "
            f"{SCHEMA!r})"
        )
    for key in ("settings", "layers", "totals"):
        if not isinstance(table.get(key), dict):
            raise ValueError(f"{where}: key {key!r} missing or not an object")
    for name, entry in table["layers"].items():
        _check_layer(where, name, entry)
    return table


def _check_layer(where: str, name: str, entry: Any) -> None:
    at = f"{where}: layer {name!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{at}: not an object")
    for key in ("kind", "input_shape", "weight_shape", "macs", "formats"):
        if key not in entry:
            raise ValueError(f"{at}: key {key!r} missing")
    if entry["kind"] not in ("linear", "conv"):
        raise ValueError(f"{at}: kind {entry['kind']!r} (expected 'linear' or 'conv')")
    for key in ("input_shape", "weight_shape"):
        if not isinstance(entry[key], list) or not all(isinstance(d, int) for d in entry[key]):
            raise ValueError(f"{at}: {key} {entry[key]!r} is not a list of ints")
    if not isinstance(entry["formats"], dict):
        raise ValueError(f"{at}: formats is not an object")
    for fmt, cost in entry["formats"].items():
        if fmt not in LAYER_FORMATS:
            raise ValueError(f"{at}: unknown format {fmt!r}; known: {', '.join(LAYER_FORMATS)}")
        for key in ("ms", "bytes", "bops"):
            value = cost.get(key) if isinstance(cost, dict) else None
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{at}: format {fmt!r}: {key} {value!r} is not a number >= 0")


# ------------------------------------------------------------------------------ additivity
def unet_latency_for(
    config: UNetConfig,
    assignment: Mapping[str, str],
    *,
    batch: int = 1,
    latent: int | tuple[int, int] | None = None,
    seq_len: int = 77,
    repeats: int = 3,
    float_dtype: Any = None,
    backend: str = "auto",
    rank_fraction: float | None = None,
    seed: int = 0,
) -> float:
    """Median ms of one jitted whole-UNet forward with each layer in its assigned format
    (others float), on random packed params of the packed shapes (`latency.unet_latency`)."""
    float_dtype = default_float_dtype() if float_dtype is None else jnp.dtype(float_dtype)
    h, w = _hw(config, latent)
    model = UNet2DConditionModel(config=config, dtype=float_dtype, param_dtype=float_dtype)
    float_shapes = param_shapes(model)
    plan = plan_for_formats(config, float_shapes, assignment, rank_fraction=rank_fraction)
    shapes = packed_shapes(
        float_shapes, plan, _placeholder_ranges(plan), float_dtype=float_dtype,
        bos_dim=config.per_block("cross_attention_dim")[0],
    )  # fmt: skip
    params = _random_like(shapes, seed)
    rng = np.random.default_rng(seed)
    inputs = jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape), float_dtype),
        example_inputs(config, batch=batch, height=h, width=w, seq_len=seq_len),
    )
    return forward_ms(model, plan, params, inputs, repeats=repeats, backend=backend)


def uniform_assignment(table: Mapping[str, Any], fmt: str) -> dict[str, str]:
    """Every layer of the table in ``fmt`` where it has a cost for it (others float)."""
    return {n: fmt for n, e in table["layers"].items() if fmt in e["formats"]}


def predicted_ms(table: Mapping[str, Any], assignment: Mapping[str, str]) -> float:
    """The table's sum for a mixed assignment (missing layers and formats: float)."""
    total = 0.0
    for name, entry in table["layers"].items():
        cost = entry["formats"].get(assignment.get(name, "float")) or entry["formats"]["float"]
        total += cost["ms"]
    return total


def additivity(
    table: Mapping[str, Any], measured: Mapping[str, tuple[Mapping[str, str], float]]
) -> dict[str, Any]:
    """Per configuration ``{label: (assignment, measured ms)}``: the table's predicted sum,
    the measured whole forward and their ratio; and the least-squares fit ``measured ~= a *
    sum + b`` over three or more configurations (fewer, or a slope <= 0: ``b = 0``, ``a`` the
    ratio of the totals; ``form`` says which) with its residuals (rms and worst, in ms)."""
    configs = {}
    for label, (assignment, ms) in measured.items():
        pred = predicted_ms(table, assignment)
        configs[label] = {"measured_ms": round(float(ms), 4), "predicted_ms": round(pred, 4),
                          "ratio": round(float(ms) / pred, 4) if pred else None}  # fmt: skip
    xs = np.array([c["predicted_ms"] for c in configs.values()], np.float64)
    ys = np.array([c["measured_ms"] for c in configs.values()], np.float64)
    a, b, form = (float(ys.sum() / xs.sum()) if xs.sum() else 1.0), 0.0, "proportional"
    if len(xs) >= 3 and np.ptp(xs) > 0:  # two points fit any line exactly: no evidence
        slope, offset = np.polyfit(xs, ys, 1)
        if slope > 0:  # a line whose time falls as the layers' sum grows is no cost model
            a, b, form = slope, offset, "affine"
    resid = ys - (a * xs + b)
    fit = {
        "a": round(float(a), 6), "b_ms": round(float(b), 4), "configs": len(xs), "form": form,
        "residual_rms_ms": round(float(np.sqrt(np.mean(resid**2))) if len(xs) else 0.0, 4),
        "residual_max_ms": round(float(np.max(np.abs(resid))) if len(xs) else 0.0, 4),
        "mean_ratio": round(statistics.fmean(c["ratio"] for c in configs.values()
                                             if c["ratio"]), 4) if configs else None,
    }  # fmt: skip
    return {"unet": configs, "fit": fit}


def check_additivity(
    config: UNetConfig, table: dict, *, repeats: int = 3, progress: bool = False
) -> dict[str, Any]:
    """Measure the whole UNet in every uniform format of the table's settings and compare
    with the table's sums (:func:`additivity`); the result is also stored in ``table``."""
    s = table["settings"]
    measured = {}
    for fmt in s["formats"]:
        assignment = uniform_assignment(table, fmt)
        if progress:
            print(f"whole UNet, {fmt} ...", file=sys.stderr, flush=True)
        ms = unet_latency_for(
            config, assignment, batch=s["batch"], latent=tuple(s["latent"]),
            seq_len=s["seq_len"], repeats=repeats, float_dtype=s["float_dtype"],
            backend=s["kernel_backend"], rank_fraction=s["rank_fraction"],
        )  # fmt: skip
        measured[fmt] = (assignment, ms)
    result = additivity(table, measured)
    table.update(result)
    return result


__all__ = [
    "SCHEMA",
    "LayerShape",
    "additivity",
    "check_additivity",
    "config_hash",
    "cost_table",
    "dispatch_ms",
    "format_plan",
    "layer_bops",
    "layer_bytes",
    "layer_module",
    "layer_packed_shapes",
    "layer_rank",
    "layer_shapes",
    "load_costs",
    "plan_for_formats",
    "predicted_ms",
    "settings_mismatch",
    "table_settings",
    "time_layer",
    "totals",
    "uniform_assignment",
    "unet_latency_for",
    "write_table",
]
