"""The per-layer quantization configuration: a pytree of arrays keyed by layer name.

``QConfig`` is what the fake-quant forward takes as an *argument*: bit-widths and activation
ranges are array leaves, so every configuration of the same layer set shares one compiled
program and ``jax.vmap`` batches over stacked configurations. What changes the computation
itself (the quantizer family, which layers split their input, BOS handling) is static
metadata of the pytree.

``QuantSpec`` is the human-facing description (uniform bits, per-layer mappings, the official
YAML files, protected layers) and ``QuantSpec.to_qconfig`` validates it against the model's
layer list and builds the arrays.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.official_format import read_bits, write_bits
from mixdq_jax.quant.lowrank import LowRank
from mixdq_jax.quant.quantizers import FLOAT_BITS

QUANT_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
ALLOWED_BITS: tuple[int, ...] = (*QUANT_BITS, FLOAT_BITS)
BOS_SUFFIXES: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")

# The official SDXL-turbo activation configs leave these 9 layers out (kept FP16): the "top 1%"
# most sensitive activations (the tests check this against tests/data/mixdq_official).
OFFICIAL_PROTECTED_ACT_LAYERS: frozenset[str] = frozenset(
    {
        "conv_in",
        "conv_out",
        "down_blocks.0.resnets.0.conv2",
        "up_blocks.2.resnets.2.conv_shortcut",
        "down_blocks.2.attentions.1.transformer_blocks.5.ff.net.2",
        "down_blocks.2.attentions.1.transformer_blocks.6.ff.net.2",
        "down_blocks.2.attentions.1.transformer_blocks.7.ff.net.2",
        "down_blocks.2.attentions.1.transformer_blocks.8.ff.net.2",
        "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
    }
)

Array = jax.Array


def is_bos_layer(name: str) -> bool:
    """Cross-attention key/value projections: their input is the text embedding."""
    return name.endswith(BOS_SUFFIXES)


def input_parts(split: int | None, channels: int) -> list[tuple[int, int]]:
    """Input-channel ranges quantized separately: one, or two for a shortcut-split layer
    (diffusers concatenates ``[upsampled hidden, skip]`` before an up block's shortcut)."""
    return [(0, channels)] if split is None else [(0, split), (split, channels)]


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class LayerQConfig:
    """One layer's quantization data. Leaves are arrays (with a leading ``(n,)`` axis when
    stacked).

    ``a_range``: the calibrated input range, ``[parts, 2]`` rows of ``(lo, hi)``, one per input
    part (:func:`input_parts`: two for a ``split`` layer); for a BOS layer it excludes token 0.

    ``w_active``: ``None``, or an *unbatched* bool scalar for a batch of configurations under
    ``vmap``: whether any configuration of the batch quantizes this layer's weights (set by
    :func:`mark_active_weights`). Why: a batched ``w_bits`` turns fake quant's "keep float"
    ``lax.cond`` into a select, which computes a dequantized copy of the weights for every
    configuration at every layer; ``False`` keeps the layer behind a real ``lax.cond`` that
    skips that work. It is data, so every batch shares one compiled program. It must agree
    with ``w_bits`` (``False`` with quantized bits would run that layer in float).

    ``group``: SVDQuant's format instead of the per-channel / per-tensor grid: weights per
    output channel and activations per token (dynamic: no calibrated range) in groups of
    ``group`` input channels, symmetric (`pallas_kernels.grid.group_codes`). ``lowrank``: the
    layer's smoothing and 16-bit low-rank branch (`mixdq_jax.quant.lowrank`), on where
    ``w_bits <= LOWRANK_BITS`` (data: one compile serves every bit configuration).

    ``fp8``: ``None`` (the ``QConfig``'s format for every layer), or a bool scalar per layer:
    this layer's quantized tensors on the FP8 e4m3 grid instead of the integer one. Data, as
    the bits are, so a sweep over per-layer formats (`mixdq_jax.quant.layer_formats`) is one
    compile (both grids are computed and one is selected: elementwise work only).
    """

    w_bits: Array
    a_bits: Array
    a_range: Array
    w_active: Array | None = None
    lowrank: LowRank | None = None
    fp8: Array | None = None
    split: int | None = field(default=None, metadata=dict(static=True))
    bos: bool = field(default=False, metadata=dict(static=True))
    group: int | None = field(default=None, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclass(frozen=True, kw_only=True)
class QConfig:
    """Per-layer configs keyed by the diffusers module name (no ``model.`` prefix).

    ``weight_format``: ``"int"`` | ``"int_sym"`` | ``"fp8"``; ``act_format``: ``"int"`` |
    ``"fp8"``. Layers not in ``layers`` are left untouched by the fake-quant context.
    """

    layers: dict[str, LayerQConfig]
    weight_format: str = field(default="int", metadata=dict(static=True))
    act_format: str = field(default="int", metadata=dict(static=True))

    def with_bits(
        self, *, w_bits: Mapping[str, Any] | None = None, a_bits: Mapping[str, Any] | None = None
    ) -> QConfig:
        """A copy with some layers' bits replaced (values are ints or arrays; not validated
        against the allowed set so that traced values can be passed inside jit)."""
        w_bits, a_bits = dict(w_bits or {}), dict(a_bits or {})
        _check_known(set(w_bits) | set(a_bits), self.layers, "with_bits")
        layers = dict(self.layers)
        for name in set(w_bits) | set(a_bits):
            lq = layers[name]
            layers[name] = replace(
                lq,
                w_bits=jnp.asarray(w_bits.get(name, lq.w_bits), jnp.int32),
                a_bits=jnp.asarray(a_bits.get(name, lq.a_bits), jnp.int32),
            )
        return replace(self, layers=layers)

    def bits(self) -> tuple[dict[str, int], dict[str, int]]:
        """``(weight_bits, act_bits)`` as Python ints (an unstacked config only)."""
        w, a = {}, {}
        for name, lq in self.layers.items():
            if np.ndim(lq.w_bits) or np.ndim(lq.a_bits):
                raise ValueError("bits() needs an unstacked QConfig (scalar bits per layer)")
            w[name], a[name] = int(lq.w_bits), int(lq.a_bits)
        return w, a


def stack_qconfigs(qconfigs: Sequence[QConfig]) -> QConfig:
    """Stack configs of the same layer set along a new leading axis, for ``jax.vmap``."""
    if not qconfigs:
        raise ValueError("stack_qconfigs: empty sequence")
    first = jax.tree_util.tree_structure(qconfigs[0])
    for i, q in enumerate(qconfigs[1:], 1):
        if jax.tree_util.tree_structure(q) != first:
            raise ValueError(
                f"stack_qconfigs: config {i} has a different structure (layer set, splits, "
                "BOS layers or formats differ) from config 0"
            )
    return jax.tree.map(lambda *xs: jnp.stack(xs), *qconfigs)


def mark_active_weights(qconfig: QConfig) -> QConfig:
    """``qconfig`` (stacked or not, concrete bits) with every layer's ``w_active`` set: whether
    any of its configurations quantizes the layer's weights (see ``LayerQConfig``)."""
    layers = {
        name: replace(lq, w_active=np.asarray(np.any(np.asarray(lq.w_bits) < FLOAT_BITS)))
        for name, lq in qconfig.layers.items()
    }
    return replace(qconfig, layers=layers)


def _check_known(names: Iterable[str], layers: Iterable[str], what: str) -> None:
    known = set(layers)
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"{what}: unknown layer(s) {_fmt(unknown)}")


def _fmt(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown


def _check_bits_value(what: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise ValueError(f"{what}: layer {name!r}: bit-width {value!r} is not a number")
    if int(value) != value or int(value) not in ALLOWED_BITS:
        raise ValueError(
            f"{what}: layer {name!r}: unsupported bit-width {value!r} "
            f"(allowed: {list(QUANT_BITS)} or {FLOAT_BITS} = float)"
        )
    return int(value)


def _resolve_bits(
    what: str,
    bits: int | Mapping[str, int],
    default: int | None,
    protected: frozenset[str],
    layers: Sequence[str],
) -> dict[str, int]:
    if isinstance(bits, Mapping):
        _check_known(bits, layers, what)
        missing = [n for n in layers if n not in bits and n not in protected]
        if missing and default is None:
            raise ValueError(
                f"{what}: no bit-width for layer(s) {_fmt(missing)} (give them in the mapping, "
                "mark them protected, or set an explicit default)"
            )
        if default is not None:
            default = _check_bits_value(what, "<default>", default)
        out = {n: _check_bits_value(what, n, bits[n]) if n in bits else default for n in layers}
    else:
        value = _check_bits_value(what, "<all>", bits)
        out = dict.fromkeys(layers, value)
    for n in protected:
        out[n] = FLOAT_BITS
    return out


def _range(name: str, value: Any, parts: int) -> np.ndarray:
    """A calibrated range as ``[parts, 2]`` float32; ``(2,)`` or ``[k, 2]`` is accepted, and a
    split range is merged when the layer is not split."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (2,) and not (arr.ndim == 2 and arr.shape[1] == 2 and arr.shape[0] in (1, 2)):
        raise ValueError(
            f"act range for {name!r}: expected shape (2,), (1, 2) or (2, 2), got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"act range for {name!r}: non-finite values {arr.tolist()}")
    rows = arr.reshape(-1, 2)
    if np.any(rows[:, 0] > rows[:, 1]):
        raise ValueError(f"act range for {name!r}: lo > hi in {arr.tolist()}")
    if parts == 2:
        if rows.shape[0] != 2:
            raise ValueError(
                f"act range for split layer {name!r}: need one range per input half, shape "
                f"(2, 2); got {arr.shape} (calibrate with shortcut splitting on)"
            )
        return rows.astype(np.float32)
    return np.asarray([[rows[:, 0].min(), rows[:, 1].max()]], np.float32)


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """What to quantize and how; ``to_qconfig`` turns it into arrays for a model's layers.

    ``weight_bits`` / ``act_bits``: one bit-width for all layers or a ``{layer: bits}``
    mapping; allowed 2..8, or 16 = float. A mapping must cover every layer that is not
    protected unless ``default_weight_bits`` / ``default_act_bits`` is given (``None``:
    missing layers are an error). ``protected_weights`` / ``protected_acts`` stay float.
    ``fp8`` replaces the integer grid by FP8 e4m3 for every quantized tensor (bits < 16);
    ``fp8_layers`` instead names the layers on the FP8 grid, the others on the integer one
    (``None``: no per-layer choice; a set, even empty: every layer carries the choice as data,
    `LayerQConfig.fp8`).
    """

    weight_bits: int | Mapping[str, int] = FLOAT_BITS
    act_bits: int | Mapping[str, int] = FLOAT_BITS
    default_weight_bits: int | None = None
    default_act_bits: int | None = None
    protected_weights: frozenset[str] = frozenset()
    protected_acts: frozenset[str] = frozenset()
    symmetric_weights: bool = False
    fp8: bool = False
    bos_aware: bool = True
    shortcut_split: bool = True
    group_size: int | None = None
    lowrank: Mapping[str, LowRank] | None = field(default=None, compare=False, repr=False)
    fp8_layers: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for attr in ("protected_weights", "protected_acts", "fp8_layers"):
            value = getattr(self, attr)
            if isinstance(value, str):
                raise TypeError(f"{attr} must be a collection of layer names, not a string")
            if value is not None:
                object.__setattr__(self, attr, frozenset(value))
        if self.fp8_layers is not None and (self.fp8 or self.group_size is not None):
            raise ValueError(
                "fp8_layers (a per-layer FP8 choice) needs the integer grid for the other "
                "layers: not with fp8=True or group_size"
            )
        if self.symmetric_weights and self.fp8:
            raise ValueError("symmetric_weights and fp8 are exclusive weight formats")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or (
                self.group_size < 2 or self.group_size % 2
            ):
                raise ValueError(f"group_size {self.group_size!r}: an even int >= 2 (64: SVDQuant)")
            if self.fp8:
                raise ValueError("group_size (SVDQuant's int groups) and fp8 are exclusive formats")
        if self.lowrank is not None and self.group_size is None:
            raise ValueError("a low-rank branch needs the group format: set group_size (64)")

    @classmethod
    def from_official_yaml(
        cls,
        weight_file: str | os.PathLike | None = None,
        act_file: str | os.PathLike | None = None,
        **options: Any,
    ) -> QuantSpec:
        """Spec from official ``final_config`` YAML files; a missing file means float.

        Layers absent from an official activation file are kept float by the official code:
        pass ``protected_acts=OFFICIAL_PROTECTED_ACT_LAYERS`` (or ``default_act_bits=16``) to
        say so; otherwise ``to_qconfig`` reports them as missing.
        """
        if weight_file is not None:
            options["weight_bits"] = read_bits(weight_file, allowed=QUANT_BITS)
        if act_file is not None:
            options["act_bits"] = read_bits(act_file, allowed=QUANT_BITS)
        return cls(**options)

    def to_qconfig(
        self,
        layers: Mapping[str, int | None] | Sequence[str],
        act_ranges: Mapping[str, Any] | None = None,
    ) -> QConfig:
        """Build the array config for ``layers``.

        ``layers``: the model's quantizable layer names, or a mapping name -> input-channel
        split point (``None`` for no split; from the model's layer registry).
        ``act_ranges``: name -> ``[parts, 2]`` ranges as calibration records them (``[lo, hi]``
        is accepted for an unsplit layer); needed for every layer with activation bits < 16.
        Extra names in ``act_ranges`` are ignored (calibrate once, build many subsets).
        """
        if isinstance(layers, Mapping):
            splits = dict(layers)
        else:
            names = list(layers)
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"to_qconfig: duplicate layer(s) {_fmt(dup)}")
            splits = dict.fromkeys(names)
        names = list(splits)
        for n, s in splits.items():
            if s is not None and (isinstance(s, bool) or not isinstance(s, int) or s <= 0):
                raise ValueError(f"to_qconfig: layer {n!r}: split {s!r} is not a positive int")
        _check_known(self.protected_weights, names, "protected_weights")
        _check_known(self.protected_acts, names, "protected_acts")
        _check_known(self.fp8_layers or (), names, "fp8_layers")
        w = _resolve_bits(
            "weight_bits", self.weight_bits, self.default_weight_bits, self.protected_weights, names
        )
        a = _resolve_bits(
            "act_bits", self.act_bits, self.default_act_bits, self.protected_acts, names
        )
        act_ranges = act_ranges or {}
        lowrank = dict(self.lowrank or {})
        _check_known(lowrank, names, "lowrank")
        # group-wise activations are scaled per token at run time: no calibrated range needed
        need = [] if self.group_size else [
            n for n in names if a[n] < FLOAT_BITS and n not in act_ranges
        ]
        if need:
            raise ValueError(f"to_qconfig: no calibrated activation range for {_fmt(need)}")

        out: dict[str, LayerQConfig] = {}
        for n in names:
            split = splits[n] if self.shortcut_split else None
            parts = 1 if split is None else 2
            if n in act_ranges:
                rng = _range(n, act_ranges[n], parts)
            else:  # float activations: the range is never used
                rng = np.zeros((parts, 2), np.float32)
            out[n] = LayerQConfig(
                w_bits=jnp.asarray(w[n], jnp.int32),
                a_bits=jnp.asarray(a[n], jnp.int32),
                a_range=jnp.asarray(rng),
                split=None if self.group_size else split,
                bos=self.bos_aware and is_bos_layer(n),
                group=self.group_size,
                lowrank=lowrank.get(n),
                fp8=None if self.fp8_layers is None else jnp.asarray(n in self.fp8_layers),
            )
        weight_format = "fp8" if self.fp8 else ("int_sym" if self.symmetric_weights else "int")
        return QConfig(
            layers=out, weight_format=weight_format, act_format="fp8" if self.fp8 else "int"
        )


def write_official_yaml(
    qconfig: QConfig,
    *,
    weight_file: str | os.PathLike | None = None,
    act_file: str | os.PathLike | None = None,
) -> None:
    """Write the bit-widths in the official format; float (16-bit) layers are left out,
    which the official code reads as "kept in float"."""
    w, a = qconfig.bits()
    if weight_file is not None:
        write_bits(weight_file, {n: b for n, b in w.items() if b < FLOAT_BITS}, allowed=QUANT_BITS)
    if act_file is not None:
        write_bits(act_file, {n: b for n, b in a.items() if b < FLOAT_BITS}, allowed=QUANT_BITS)
