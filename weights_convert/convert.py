"""Map PyTorch state dicts to Flax parameter trees and back.

Our Flax modules are named exactly like the PyTorch modules (``name="down_blocks.1"``), so a Flax
parameter path joined with dots is the PyTorch key up to the leaf name and layout. That makes the
conversion generic and strict: every Flax parameter must find its tensor, every tensor must be
used, and every shape must match, or the error names the key and the file it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# PyTorch buffers that carry no learned value and have no Flax counterpart.
_IGNORED_SUFFIXES = ("position_ids",)


class ConversionError(ValueError):
    """A checkpoint does not fit the model: missing/unexpected key or wrong shape."""


def _torch_key(path: tuple[str, ...], ndim: int) -> tuple[str, str]:
    """PyTorch key and layout tag for a Flax parameter path."""
    *module, leaf = path
    prefix = ".".join(module)
    if leaf == "kernel":
        return f"{prefix}.weight", ("linear" if ndim == 2 else "conv")
    if leaf in ("scale", "embedding"):
        return f"{prefix}.weight", "copy"
    return f"{prefix}.{leaf}" if prefix else leaf, "copy"


def _to_flax_layout(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return x.T
    if layout == "conv":  # OIHW -> HWIO
        return np.transpose(x, (2, 3, 1, 0))
    return x


def _to_torch_layout(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return x.T
    if layout == "conv":  # HWIO -> OIHW
        return np.transpose(x, (3, 2, 0, 1))
    return x


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    target: Mapping,
    *,
    sources: Mapping[str, str] | None = None,
    what: str = "model",
    dtype: np.dtype | None = None,
    to_leaf: Callable[[np.ndarray], Any] | None = None,
    release: Callable[[np.ndarray], None] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict:
    """Build a Flax ``params`` tree shaped like ``target`` from a PyTorch-named state dict.

    ``target`` is a params tree of arrays or ``jax.ShapeDtypeStruct`` (from ``jax.eval_shape``).
    ``sources`` maps each key to the file it was read from, for error messages. ``to_leaf``
    turns each converted numpy tensor into the stored leaf as soon as it is made (e.g.
    ``jnp.asarray``: one tensor at a time goes to the device and its host copy is dropped,
    instead of a whole host tree next to a whole device tree); ``progress`` wraps the loop
    over tensors (a progress bar); ``release`` is called with each source tensor once it is
    converted (dropping a memory-mapped checkpoint's pages).
    """
    sources = sources or {}
    flat = traverse_util.flatten_dict(target)
    out: dict[tuple[str, ...], Any] = {}
    used: set[str] = set()
    missing: list[str] = []
    items = flat.items() if progress is None else progress(flat.items())
    for path, leaf in items:
        key, layout = _torch_key(path, len(leaf.shape))
        if key not in state:
            missing.append(f"{key} (Flax param {'/'.join(path)})")
            continue
        source = np.asarray(state[key])
        where = sources.get(key, "<state dict>")
        value = _to_flax_layout(source, layout)
        if tuple(value.shape) != tuple(leaf.shape):
            raise ConversionError(
                f"{what}: tensor {key!r} in {where} has shape {tuple(source.shape)}"
                f", expected {_torch_shape(leaf.shape, layout)}"
            )
        want = np.dtype(dtype or leaf.dtype)
        check_weight_dtype(source, want, key=key, where=where, what=what)
        with np.errstate(over="ignore", invalid="ignore"):  # reported by the check below
            value = value.astype(want)
        check_finite_weight(value, source, key=key, where=where, what=what)
        out[path] = value if to_leaf is None else to_leaf(value)
        if release is not None:
            release(state[key])
        used.add(key)
    if missing:
        files = sorted(set(sources.values())) or ["<state dict>"]
        raise ConversionError(
            f"{what}: {len(missing)} tensor(s) missing from {', '.join(files)}: "
            + ", ".join(missing[:10])
            + (" ..." if len(missing) > 10 else "")
        )
    unexpected = [k for k in state if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        where = sorted({sources.get(k, "<state dict>") for k in unexpected})
        raise ConversionError(
            f"{what}: {len(unexpected)} unexpected tensor(s) in {', '.join(where)}: "
            + ", ".join(sorted(unexpected)[:10])
            + (" ..." if len(unexpected) > 10 else "")
        )
    return traverse_util.unflatten_dict(out)


def check_weight_dtype(
    value: np.ndarray, want: np.dtype, *, key: str, where: str, what: str
) -> None:
    """Refuse an integer or bool tensor where a float weight belongs: a cast would silently
    turn codes or masks into weights."""
    if not jnp.issubdtype(want, jnp.floating):  # bfloat16 and fp8 are not numpy inexact
        return
    if value.dtype == np.bool_ or np.issubdtype(value.dtype, np.integer):
        raise ConversionError(
            f"{what}: tensor {key!r} in {where} is {value.dtype}, but the model needs a float "
            "weight there; the file is not this model's float checkpoint (a quantized or "
            "corrupt file?)"
        )


def check_finite_weight(
    value: np.ndarray, source: np.ndarray, *, key: str, where: str, what: str
) -> None:
    """Refuse NaN/inf in a converted float weight (``source``: the tensor as stored, to tell
    a damaged file from a value that overflows the load dtype).

    One pass per tensor as it streams (a float64 sum: NaN and inf survive it, finite values
    cannot overflow it), so the check costs about one read of the weights."""
    if not value.size or not jnp.issubdtype(value.dtype, jnp.floating):
        return
    if np.isfinite(np.sum(value, dtype=np.float64)):
        return
    stored = np.isfinite(np.asarray(source, np.float32))
    if stored.all():
        bad = int(value.size - np.count_nonzero(np.isfinite(value.astype(np.float32))))
        raise ConversionError(
            f"{what}: tensor {key!r} in {where} has {bad} value(s) too large for "
            f"{value.dtype} (inf after the cast); load the model in float32 (--dtype float32)"
        )
    bad = int(stored.size - np.count_nonzero(stored))
    first = [int(i) for i in np.argwhere(~stored)[0]]
    raise ConversionError(
        f"{what}: tensor {key!r} in {where} has {bad} non-finite value(s) (NaN/inf) of "
        f"{stored.size}, the first at index {first}; the checkpoint is damaged or was saved "
        "from a diverged model: re-download or re-convert it"
    )


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    return tuple(_to_torch_layout(np.empty(shape, dtype=np.uint8), layout).shape)


def flax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: PyTorch-named numpy state dict from a Flax tree."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        arr = np.asarray(jax.device_get(leaf))
        key, layout = _torch_key(path, arr.ndim)
        out[key] = np.ascontiguousarray(_to_torch_layout(arr, layout))
    return out
