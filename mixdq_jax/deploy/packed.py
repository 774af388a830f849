"""Freeze a quantization config into real low-bit storage (the deployment side of MixDQ).

A :class:`DeployPlan` is the *static* part of a frozen configuration: per layer the weight and
activation bits, the storage width (int8, or int4/int2 packed two/four per byte), symmetric or
asymmetric weights, the shortcut split and BOS handling. :func:`pack_unet_params` turns a float
UNet params tree into the packed tree the real path runs on; it is pure ``jnp`` so
``jax.eval_shape`` gives the exact packed shapes of the full SDXL UNet without weights.

Packed node of a quantized layer (replaces ``{"kernel", "bias"}``), one ``q<j>`` per input part
(``q0``, plus ``q1`` for a shortcut-split conv):

- ``q<j>/w``: weight codes, int8. Dense ``(K, N)``; conv ``HWIO`` when stored in int8, else the
  GEMM matrix ``(KH*KW*Cin, Cout)``; int4/int2 storage packs that along K
  (`pallas_kernels.pack_weights`). 3-bit weights are stored in int4 fields, 5..7-bit in int8.
- ``q<j>/w_scale`` f32 ``(N,)``; ``q<j>/w_zp`` int8 ``(N,)`` for asymmetric weights only;
  ``w ~= w_scale * (w - w_zp)``.
- ``q<j>/colsum`` int32 ``(N,)`` (integer path), ``q<j>/a_scale`` f32 and ``q<j>/a_zp`` int32
  (quantized activations), from the calibrated range.
- FP8 layers (``LayerPlan.fp8``, the e4m3 grid of `pallas_kernels.grid`): ``q<j>/w`` holds
  ``float8_e4m3fn`` codes in the int8 layout (Dense ``(K, N)``, conv HWIO), ``q<j>/w_scale``
  f32 ``(N,)`` maps each output channel's absmax to 448, ``q<j>/a_scale`` f32 the calibrated
  range's absmax (no zero points, no column sums): ``w ~= w_scale * w``, ``x ~= a_scale * x``.
- ``bias`` (float), ``kernel`` (float, only when the weights stay float), and for the
  BOS-aware ``attn2.to_k/to_v``: ``bos_in`` (the BOS token embedding) and ``bos_row``
  ``= bos_in @ W + b`` in f32, computed from the float weights at export.

A grouped layer (SVDQuant's format, ``LayerPlan.group``; layout and math in `grouped`) has
instead ``q0/w`` (the residual's codes, the GEMM matrix ``(K_pad, N)``: int4 group-packed to
``(K_pad / 2, N)`` for 2..4-bit weights, int8 for 5..8), ``q0/w_scale`` f32
``(K_pad / group, N)`` and no activation parameters (per-token scales at run time); with a
low-rank decomposition ``smooth`` f32 ``(Cin,)``, and for weights of at most
``LOWRANK_BITS`` bits the branch ``down`` f16 (the kernel's shape, ``out`` -> rank) and
``up`` f16 ``(rank, N)``; a grouped layer with float weights stores ``kernel`` = the
smoothed kernel ``smooth * W``.

No float copy of quantized weights is kept. Weight codes come from the one grid
(`pallas_kernels.grid`) the fake quantizer uses, so they reproduce it exactly: asymmetric
codes ``q_u in [0, 2^b-1]`` are stored shifted to the signed range (``q_u - 2^(b-1)``, zero
point shifted alike), so the same int8 GEMM serves both; the asymmetric weight zero point
costs an activation row-sum correction in the epilogue (see `layers`), the symmetric form
(the official run config) none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.deploy import grouped
from mixdq_jax.quant.lowrank import LOWRANK_BITS, LowRank
from mixdq_jax.quant.qconfig import QConfig, input_parts
from pallas_kernels import (
    activation_qparams,
    grid,
    pack_weights,
    unpack_weights,
    values_per_byte,
    weight_column_sums,
)
from pallas_kernels.grid import FLOAT_BITS

FORMAT_VERSION = 1
STORAGE_BITS = (2, 4, 8)
# Leaves of a packed node that stay float32 whatever dtype the float params use.
F32_LEAVES = frozenset({"w_scale", "a_scale", "bos_in", "bos_row", "branch_scale", "smooth"})

Array = jax.Array


@dataclass(frozen=True, kw_only=True)
class LayerPlan:
    """How one layer is stored and run. ``w_bits``/``a_bits`` 16 mean float."""

    name: str
    kind: str  # "linear" | "conv"
    weight_shape: tuple[int, ...]  # the float kernel, Flax layout
    w_bits: int
    a_bits: int
    storage_bits: int  # 2 | 4 | 8, or 16 when the weights stay float
    symmetric: bool
    split: int | None = None
    bos: bool = False
    # SVDQuant's group format (`grouped`): group size, a stored smoothing vector, the rank of
    # the stored low-rank branch (0: none). Left out of ``as_dict`` at their defaults, so a
    # per-channel plan reads and writes exactly as before.
    group: int | None = None
    smooth: bool = False
    rank: int = 0
    # The FP8 e4m3 grid instead of the integer one (per output channel weights, per tensor
    # activations, 8-bit storage); left out of ``as_dict`` at its default.
    fp8: bool = False

    def __post_init__(self) -> None:
        if self.fp8 and (self.group is not None or self.storage_bits not in (8, FLOAT_BITS)):
            raise ValueError(
                f"layer {self.name!r}: fp8 takes 8-bit storage and no groups (got storage "
                f"{self.storage_bits}, group {self.group})"
            )

    @property
    def mode(self) -> str:
        """``int`` (int8 GEMM; the fp8 GEMM for an ``fp8`` plan), ``weight_only`` (A16:
        dequantize, float op), ``act_only`` (W16), or ``float`` (a float layer planned only to
        carry a runtime LoRA branch)."""
        if self.w_bits < FLOAT_BITS:
            return "int" if self.a_bits < FLOAT_BITS else "weight_only"
        return "act_only" if self.a_bits < FLOAT_BITS else "float"

    def parts(self) -> list[tuple[int, int]]:
        """Input-channel ranges quantized separately (two for a shortcut-split conv)."""
        return input_parts(self.split, self.weight_shape[-2])

    def part_k(self, part: tuple[int, int]) -> int:
        """GEMM reduction length of one part (KH*KW*Cin_part for a conv)."""
        return int(np.prod(self.weight_shape[:-2], dtype=np.int64)) * (part[1] - part[0])

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        for key, default in (("group", None), ("smooth", False), ("rank", 0), ("fp8", False)):
            if d[key] == default:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerPlan:
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"plan entry of layer {d.get('name')!r} has field(s) {unknown} this mixdq-jax "
                "does not know (written by a newer version): upgrade mixdq-jax or re-export"
            )
        d["weight_shape"] = tuple(int(v) for v in d["weight_shape"])
        return cls(**d)


def storage_bits_for(w_bits: int, ks: list[int]) -> int:
    """Narrowest packed width holding ``w_bits`` whose values-per-byte divides every K."""
    if w_bits >= FLOAT_BITS:
        return FLOAT_BITS
    for s in (2, 4):
        if w_bits <= s and all(k % values_per_byte(s) == 0 for k in ks):
            return s
    return 8


def grouped_plan(
    name: str,
    shape: tuple[int, ...],
    w_bits: int,
    a_bits: int,
    group: int,
    lowrank: LowRank | None,
    bos: bool,
) -> LayerPlan:
    """The plan of a grouped layer: int4 fields for weights up to 4 bits (group-packed), int8
    up to 8; the branch stored where the fake quantizer turns it on (``w_bits <=
    LOWRANK_BITS``)."""
    if lowrank is not None:
        cin, n = shape[-2], shape[-1]
        want = (tuple(shape[:-1]), (lowrank.rank, n), (cin,))
        got = (tuple(lowrank.down.shape[:-1]), tuple(lowrank.up.shape), tuple(lowrank.smooth.shape))
        if got != want:
            raise ValueError(
                f"layer {name!r}: low-rank shapes down {tuple(lowrank.down.shape)}, up "
                f"{tuple(lowrank.up.shape)}, smooth {tuple(lowrank.smooth.shape)} do not fit "
                f"its kernel {shape} (decompose this model's own kernel: quant.lowrank)"
            )
    if w_bits >= FLOAT_BITS:
        storage = FLOAT_BITS
    else:
        storage = 4 if w_bits <= 4 else 8
    on = lowrank is not None and w_bits <= LOWRANK_BITS
    return LayerPlan(
        name=name,
        kind="linear" if len(shape) == 2 else "conv",
        weight_shape=shape,
        w_bits=w_bits,
        a_bits=a_bits,
        storage_bits=storage,
        symmetric=True,
        bos=bos,
        group=group,
        smooth=lowrank is not None,
        rank=lowrank.rank if on else 0,
    )


@dataclass(frozen=True, kw_only=True)
class DeployPlan:
    """The static description of a frozen configuration: ``{layer name: LayerPlan}``."""

    layers: Mapping[str, LayerPlan] = field(default_factory=dict)

    @classmethod
    def from_qconfig(cls, qconfig: QConfig, params: Any) -> DeployPlan:
        """Plan for every configured layer that is not fully float; ``params`` is the float
        UNet params tree (arrays or ``ShapeDtypeStruct``s) giving kernel shapes."""
        if qconfig.weight_format == "fp8" or qconfig.act_format == "fp8":
            raise ValueError("deployment supports integer formats only, not fp8 fake quant")
        symmetric = qconfig.weight_format == "int_sym"
        w_bits, a_bits = qconfig.bits()
        layers = {}
        for name, lq in qconfig.layers.items():
            wb, ab = w_bits[name], a_bits[name]
            if wb >= FLOAT_BITS and ab >= FLOAT_BITS:
                continue
            fp8 = lq.fp8 is not None and bool(np.asarray(lq.fp8))  # a per-layer FP8 choice
            if fp8 and (wb < FLOAT_BITS and wb != 8 or ab < FLOAT_BITS and ab != 8):
                raise ValueError(f"layer {name!r}: FP8 is 8-bit (got W{wb}A{ab})")
            shape = tuple(int(d) for d in node_at(params, name)["kernel"].shape)
            if lq.group is not None:
                layers[name] = grouped_plan(name, shape, wb, ab, lq.group, lq.lowrank, lq.bos)
                continue
            lp = LayerPlan(
                name=name,
                kind="linear" if len(shape) == 2 else "conv",
                weight_shape=shape,
                w_bits=wb,
                a_bits=ab,
                storage_bits=FLOAT_BITS,
                symmetric=symmetric,
                split=lq.split,
                bos=lq.bos,
                fp8=fp8,
            )
            ks = [lp.part_k(p) for p in lp.parts()]
            layers[name] = LayerPlan(**{**asdict(lp), "storage_bits": storage_bits_for(wb, ks)})
        return cls(layers=layers)

    def as_dict(self) -> dict[str, Any]:
        return {name: lp.as_dict() for name, lp in self.layers.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeployPlan:
        return cls(layers={name: LayerPlan.from_dict(v) for name, v in d.items()})

    def lowrank_shapes(self) -> dict[str, LowRank]:
        """``{layer: LowRank of ShapeDtypeStructs}`` the plan implies (what the packer is given
        for a grouped layer with smoothing: shapes only, e.g. to check a loaded file)."""
        # rank >= 1: the packer reads the factors only at rank > 0
        return {name: LowRank.shapes(lp.weight_shape, max(lp.rank, 1))
                for name, lp in self.layers.items() if lp.smooth}  # fmt: skip

    def needs_bos(self) -> bool:
        return any(lp.bos and lp.mode != "act_only" for lp in self.layers.values())


# ------------------------------------------------------------------------------ tree access
def path_of(tree: Mapping, name: str) -> tuple[str, ...]:
    """Keys leading to a module's node; module names themselves contain dots."""
    node, rest, path = tree, name, []
    while rest:
        for key in sorted(node, key=len, reverse=True):
            if rest == key or rest.startswith(key + "."):
                node, rest = node[key], rest[len(key) + 1 :]
                path.append(key)
                break
        else:
            raise KeyError(f"layer {name!r} has no parameters in the params tree")
    return tuple(path)


def node_at(tree: Mapping, name: str) -> Mapping:
    node = tree
    for key in path_of(tree, name):
        node = node[key]
    return node


def layer_kernel(params: Mapping[str, Any], name: str) -> Any:
    """The kernel of layer ``name`` (Dense ``(in, out)``, Conv ``HWIO``: output channels
    last) in a params tree."""
    return node_at(params, name)["kernel"]


def with_layer_kernel(params: Mapping[str, Any], name: str, kernel: Any) -> dict[str, Any]:
    """A copy of ``params`` with layer ``name``'s kernel replaced (the rest shared)."""
    path = path_of(params, name)
    return _replace_node(params, (*path, "kernel"), kernel)


def _replace_node(tree: Mapping, path: tuple[str, ...], value: Any) -> dict:
    """A copy of ``tree`` with ``value`` at ``path`` (missing parents are created)."""
    out = dict(tree)
    if len(path) == 1:
        out[path[0]] = value
    else:
        out[path[0]] = _replace_node(tree.get(path[0], {}), path[1:], value)
    return out


# ------------------------------------------------------------------------------ quantization
def quantize_weight_codes(
    w: Array, bits: int, *, symmetric: bool
) -> tuple[Array, Array, Array | None]:
    """Per-output-channel signed codes (int8), scale (f32) and zero point (int8 or None).

    The grid is `pallas_kernels.grid`, the fake quantizer's own: ``scale * (codes - zp)``
    equals its output bit for bit.
    """
    lo, hi = grid.channel_range(w)
    if symmetric:
        scale, half = grid.symmetric_params(jnp.maximum(-lo, hi), bits)
        q = grid.codes(w, scale, None, -half - 1.0, half)
        return q.astype(jnp.int8), scale, None
    scale, zero, levels = grid.affine_params(lo, hi, bits)
    q = grid.codes(w, scale, zero, 0.0, levels)
    shift = jnp.float32(grid.signed_shift(bits))
    return (q - shift).astype(jnp.int8), scale, (zero - shift).astype(jnp.int8)


def dequantize_weight(q: Mapping[str, Array], lp: LayerPlan, part: tuple[int, int]) -> Array:
    """Float (f32) kernel of one part from its stored codes, in the Flax layout."""
    w = grid.dequantize(unpacked_codes(q["w"], lp), q["w_scale"], q.get("w_zp"))
    shape = (*lp.weight_shape[:-2], part[1] - part[0], lp.weight_shape[-1])
    return w.reshape(shape)


def unpacked_codes(w: Array, lp: LayerPlan) -> Array:
    """int8 codes as a 2-D ``(K, N)`` matrix or the stored 4-D HWIO array."""
    if lp.storage_bits in (2, 4):
        return unpack_weights(w, lp.storage_bits)
    return w


def check_layer_inputs(lp: LayerPlan, act_range: Any, x_bos: Any) -> None:
    """What packing ``lp`` needs besides its weights: a range per input part for quantized
    activations, the BOS embedding for a BOS-aware layer; a ValueError naming the layer."""
    if lp.a_bits < FLOAT_BITS and lp.group is None:  # grouped: per-token scales at run time
        if act_range is None:
            raise ValueError(f"layer {lp.name!r}: quantized activations need a calibrated range")
        rows = int(np.prod(np.shape(act_range))) // 2
        if rows != len(lp.parts()):
            raise ValueError(
                f"layer {lp.name!r}: {rows} activation range(s) for {len(lp.parts())} input "
                "part(s)"
            )
    if lp.bos and lp.mode != "act_only" and x_bos is None:
        raise ValueError(f"layer {lp.name!r} is BOS-aware: pass the BOS token embedding (x_bos)")


def check_lowrank(lp: LayerPlan, lowrank: LowRank | None) -> None:
    """A grouped layer with smoothing needs its `LowRank`; a ValueError naming the layer."""
    if lp.smooth and lowrank is None:
        raise ValueError(
            f"layer {lp.name!r}: the plan stores a smoothing vector (a low-rank "
            "decomposition) but none was given: pass the spec's lowrank mapping"
        )
    if lowrank is not None and lp.rank and lowrank.rank != lp.rank:
        raise ValueError(
            f"layer {lp.name!r}: the plan stores a rank-{lp.rank} branch, the given "
            f"decomposition has rank {lowrank.rank}"
        )


def _bos_outputs(out: dict, kernel: Array, bias: Array | None, x_bos: Array) -> None:
    xb = jnp.asarray(x_bos, jnp.float32)
    row = jnp.dot(xb, kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if bias is not None:
        row = row + bias.astype(jnp.float32)
    out["bos_in"], out["bos_row"] = xb, row


def pack_grouped_layer(
    node: Mapping[str, Array],
    lp: LayerPlan,
    lowrank: LowRank | None,
    x_bos: Array | None,
    float_dtype: Any,
) -> dict[str, Any]:
    """The packed node of a grouped layer (layout: the module docstring and `grouped`).

    The residual's codes and scales are the fake quantizer's own (from the decomposition in
    f32), the smoothing vector is stored in f32, the branch factors in float16: that rounding
    is the only difference from the fake-quant model (`grouped`)."""
    check_layer_inputs(lp, None, x_bos)
    check_lowrank(lp, lowrank)
    kernel = node["kernel"]
    bias = node.get("bias")
    out: dict[str, Any] = {}
    if bias is not None:
        out["bias"] = bias.astype(float_dtype)
    smooth = down = up = None
    if lp.smooth:
        smooth, down, up = grouped.branch_f32(lowrank)
        out["smooth"] = smooth.astype(grouped.SMOOTH_DTYPE)
        if lp.rank:
            out["down"] = down.astype(grouped.BRANCH_DTYPE)
            out["up"] = up.astype(grouped.BRANCH_DTYPE)
        else:
            down = up = None
    resid = grouped.residual(kernel, smooth, down, up)
    if lp.w_bits < FLOAT_BITS:
        codes, scale = grouped.group_weight_codes(resid, lp.w_bits, lp.group)
        out["q0"] = {"w": grouped.pack_codes(codes, lp.storage_bits, lp.group), "w_scale": scale}
    else:
        out["kernel"] = resid.astype(float_dtype)  # the smoothed kernel: x / s runs first
    if lp.bos and lp.mode != "act_only":
        _bos_outputs(out, kernel, bias, x_bos)
    return out


def fp8_part(kernel: Array | None, act_range: Array | None) -> dict[str, Array]:
    """One input part of an FP8 layer: e4m3 weight codes with their per-output-channel scale
    (absmax -> 448) and the activation scale of the calibrated range, on the grid the fake
    quantizer (`quant.quantizers.fake_quant_fp8`) uses, so the codes are its own."""
    q: dict[str, Array] = {}
    if kernel is not None:
        lo, hi = grid.channel_range(kernel)
        scale = grid.fp8_scale(jnp.maximum(-lo, hi))
        q["w"] = grid.fp8_round(kernel, scale).astype(jnp.float8_e4m3fn)
        q["w_scale"] = scale
    if act_range is not None:
        lo, hi = grid.with_zero(act_range[0], act_range[1])
        q["a_scale"] = grid.fp8_scale(jnp.maximum(-lo, hi))
    return q


def pack_layer(
    node: Mapping[str, Array],
    lp: LayerPlan,
    act_range: Array | None,
    x_bos: Array | None,
    float_dtype: Any,
    lowrank: LowRank | None = None,
) -> dict[str, Any]:
    """The packed node of one layer from its float ``{"kernel", "bias"}`` node (``lowrank``:
    a grouped layer's smoothing and branch)."""
    if lp.group is not None:
        return pack_grouped_layer(node, lp, lowrank, x_bos, float_dtype)
    check_layer_inputs(lp, act_range, x_bos)
    kernel = node["kernel"]
    bias = node.get("bias")
    out: dict[str, Any] = {}
    if bias is not None:
        out["bias"] = bias.astype(float_dtype)
    if lp.mode == "act_only":
        out["kernel"] = kernel.astype(float_dtype)
    ranges = None
    if lp.a_bits < FLOAT_BITS:
        ranges = jnp.asarray(act_range, jnp.float32).reshape(-1, 2)
    for j, part in enumerate(lp.parts()):
        if lp.fp8:
            out[f"q{j}"] = fp8_part(
                kernel[..., part[0] : part[1], :] if lp.w_bits < FLOAT_BITS else None,
                None if ranges is None else ranges[j],
            )
            continue
        q: dict[str, Array] = {}
        if lp.w_bits < FLOAT_BITS:
            codes, scale, zp = quantize_weight_codes(
                kernel[..., part[0] : part[1], :], lp.w_bits, symmetric=lp.symmetric
            )
            matrix = codes.reshape(-1, codes.shape[-1])
            if lp.storage_bits in (2, 4):
                q["w"] = pack_weights(matrix, lp.storage_bits)
            else:
                q["w"] = codes  # Dense (K, N) or conv HWIO
            q["w_scale"] = scale
            if zp is not None:
                q["w_zp"] = zp
            if lp.a_bits < FLOAT_BITS:
                q["colsum"] = weight_column_sums(matrix)
        if ranges is not None:
            a_scale, a_zp = activation_qparams(ranges[j, 0], ranges[j, 1], lp.a_bits)
            q["a_scale"], q["a_zp"] = a_scale, a_zp
        out[f"q{j}"] = q
    if lp.bos and lp.mode != "act_only":
        _bos_outputs(out, kernel, bias, x_bos)
    return out


def pack_unet_params(
    params: Mapping,
    plan: DeployPlan,
    act_ranges: Mapping[str, Any] | None = None,
    x_bos: Array | None = None,
    *,
    float_dtype: Any = None,
    lowrank: Mapping[str, LowRank] | None = None,
) -> dict:
    """The packed UNet params tree: every planned layer replaced by its packed node, every
    other float leaf cast to ``float_dtype`` (kept as is when ``None``).

    ``act_ranges``: ``{layer: [lo, hi]}`` for layers with quantized activations;
    ``x_bos``: the text encoders' BOS token embedding (``context[0, 0]``), needed for
    BOS-aware layers; ``lowrank``: ``{layer: LowRank}`` of grouped layers with smoothing
    (the spec's). Pure jnp: ``jax.eval_shape`` of it gives the packed shapes.
    """
    act_ranges, lowrank = act_ranges or {}, lowrank or {}
    out = dict(params)
    if float_dtype is not None:
        out = jax.tree.map(lambda a: _cast_float(a, float_dtype), out)
    for name, lp in plan.layers.items():
        path = path_of(params, name)
        node = node_at(params, name)
        fd = float_dtype if float_dtype is not None else node["kernel"].dtype
        packed = pack_layer(node, lp, act_ranges.get(name), x_bos, fd, lowrank.get(name))
        out = _replace_node(out, path, packed)
    return out


def pack_unet_params_by_layer(
    params: Mapping,
    plan: DeployPlan,
    act_ranges: Mapping[str, Any] | None = None,
    x_bos: Array | None = None,
    *,
    float_dtype: Any = None,
    lowrank: Mapping[str, LowRank] | None = None,
) -> dict:
    """:func:`pack_unet_params`, one compiled program per distinct layer shape instead of one
    for the whole tree: the temporaries of one layer are alive at a time (at SDXL size the
    whole-tree program needed memory for every layer's codes at once). Same result."""
    act_ranges, lowrank = act_ranges or {}, lowrank or {}
    planned = {path_of(params, name): name for name in plan.layers}
    rest = _without(params, planned)
    cast = jax.jit(lambda t: jax.tree.map(lambda a: _cast_float(a, float_dtype), t))
    out = cast(rest) if float_dtype is not None else dict(rest)
    for path, name in planned.items():
        lp = plan.layers[name]
        node = node_at(params, name)
        act, fd = act_ranges.get(name), float_dtype or node["kernel"].dtype
        check_layer_inputs(lp, act, x_bos)  # with the layer's name; the program is nameless
        check_lowrank(lp, lowrank.get(name))
        packed = _pack_layer_jit(
            dict(node), replace(lp, name=""), act, x_bos, jnp.dtype(fd), lowrank.get(name)
        )
        out = _replace_node(out, path, packed)
    return out


_pack_layer_jit = jax.jit(pack_layer, static_argnums=(1, 4))


def _without(tree: Mapping, paths: Mapping[tuple[str, ...], str]) -> dict:
    """``tree`` without the nodes at ``paths`` (emptied parents dropped)."""
    out = {}
    for key, value in tree.items():
        inner = {p[1:]: n for p, n in paths.items() if p[0] == key}
        if (key,) in paths:
            continue
        if inner and isinstance(value, Mapping):
            sub = _without(value, inner)
            if sub:
                out[key] = sub
        else:
            out[key] = value
    return out


def _cast_float(a: Any, dtype: Any) -> Any:
    if jnp.issubdtype(a.dtype, jnp.floating):
        return a.astype(dtype)
    return a


def packed_shapes(
    params: Mapping,
    plan: DeployPlan,
    act_ranges: Mapping[str, Any] | None = None,
    *,
    float_dtype: Any = None,
    bos_dim: int | None = None,
    lowrank: Mapping[str, LowRank] | None = None,
) -> dict:
    """``jax.ShapeDtypeStruct`` tree of the packed params, by tracing the real packer
    (``params`` may itself be abstract): no weight is materialised. ``lowrank`` defaults to
    the shapes the plan implies (`DeployPlan.lowrank_shapes`)."""
    x_bos = None if bos_dim is None else jax.ShapeDtypeStruct((bos_dim,), jnp.float32)
    lowrank = plan.lowrank_shapes() if lowrank is None else lowrank
    return jax.eval_shape(
        lambda p, r, xb, lr: pack_unet_params(p, plan, r, xb, float_dtype=float_dtype,
                                              lowrank=lr),  # fmt: skip
        params,
        dict(act_ranges or {}),
        x_bos,
        dict(lowrank),
    )
