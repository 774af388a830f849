"""Read and write the YAML formats of the official MixDQ release.

The files key layers by ``model.<diffusers module name>``; in memory the ``model.`` prefix is
dropped so names match the Flax param paths. Readers are strict because a silently skipped
layer or a NaN sensitivity turns into a wrong bit allocation far away from its cause: every
problem raises ``ValueError`` naming the file, the layer and the offending value.

Formats:
- bits (``final_config/*``): ``model.layer: 8``; layers absent from an activation config are
  kept in float.
- sensitivity (``sensitivity/*``): ``model.layer: [s@2bit, s@4bit, s@8bit]``.
- sizes (``tensor_ratio/*``): ``model.layer: relative element count``.
- layer lists (protected layers): a YAML sequence of layer names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence
from numbers import Real
from typing import Any

import yaml

from mixdq_jax.io_utils import atomic_write_text, read_text

PREFIX = "model."
SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8)
# Sensitivity lists hold one score per measured bit-width, in this order.
SENSITIVITY_BITS: tuple[int, ...] = (2, 4, 8)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ValueError(f"duplicate layer {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load(path: str | os.PathLike) -> Any:
    text = read_text(path)  # a byte that is not UTF-8: the file and line are named
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - strict SafeLoader subclass
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None


def _load_layer_mapping(path: str | os.PathLike) -> dict[str, Any]:
    data = _load(path)
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"{path}: expected a non-empty mapping of '{PREFIX}<layer>' to values, "
            f"got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str) or not key.startswith(PREFIX) or key == PREFIX:
            raise ValueError(f"{path}: layer {key!r} does not start with {PREFIX!r}")
        out[key[len(PREFIX) :]] = value
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_bits(where: str, layer: str, value: Any, allowed: Collection[int]) -> int:
    if not _is_number(value) or not math.isfinite(value) or int(value) != value:
        raise ValueError(f"{where}: layer {layer!r}: bit-width {value!r} is not an integer")
    if int(value) not in allowed:
        raise ValueError(
            f"{where}: layer {layer!r}: unsupported bit-width {value!r} "
            f"(supported: {sorted(allowed)})"
        )
    return int(value)


def _check_scores(where: str, layer: str, value: Any) -> tuple[float, ...]:
    n = len(SENSITIVITY_BITS)
    if (
        isinstance(value, (str, bytes, Mapping))
        or not isinstance(value, Sequence)
        or len(value) != n
        or not all(_is_number(v) for v in value)
    ):
        raise ValueError(
            f"{where}: layer {layer!r}: expected a list of {n} numbers "
            f"(scores at {list(SENSITIVITY_BITS)} bits), got {value!r}"
        )
    if not all(math.isfinite(v) for v in value):
        raise ValueError(f"{where}: layer {layer!r}: non-finite sensitivity {list(value)!r}")
    return tuple(float(v) for v in value)


def _check_size(where: str, layer: str, value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: layer {layer!r}: size {value!r} is not a positive number")
    return float(value)


def _strip(where: str, names: Iterable[str]) -> None:
    for name in names:
        if not isinstance(name, str) or not name or name.startswith(PREFIX):
            raise ValueError(f"{where}: layer {name!r}: in-memory names carry no {PREFIX!r} prefix")


def _dump(mapping: Mapping[str, Any]) -> str:
    prefixed = {f"{PREFIX}{name}": mapping[name] for name in sorted(mapping)}
    return yaml.safe_dump(prefixed, sort_keys=True, default_flow_style=False)


def read_bits(
    path: str | os.PathLike, *, allowed: Collection[int] = SUPPORTED_BITS
) -> dict[str, int]:
    """``{layer: bits}`` from an official bit-width config (``final_config/*.yaml``)."""
    data = _load_layer_mapping(path)
    return {layer: _check_bits(str(path), layer, v, allowed) for layer, v in data.items()}


def write_bits(
    path: str | os.PathLike,
    bits: Mapping[str, int],
    *,
    allowed: Collection[int] = SUPPORTED_BITS,
) -> None:
    """Write ``{layer: bits}`` atomically, sorted by layer, with the ``model.`` prefix."""
    _strip(str(path), bits)
    checked = {layer: _check_bits(str(path), layer, v, allowed) for layer, v in bits.items()}
    if not checked:
        raise ValueError(f"{path}: refusing to write an empty bit-width config")
    atomic_write_text(path, _dump(checked))


def read_sensitivity(path: str | os.PathLike) -> dict[str, tuple[float, ...]]:
    """``{layer: (s@2, s@4, s@8)}`` from an official sensitivity file."""
    data = _load_layer_mapping(path)
    return {layer: _check_scores(str(path), layer, v) for layer, v in data.items()}


def write_sensitivity(path: str | os.PathLike, sensitivity: Mapping[str, Sequence[float]]) -> None:
    """Write ``{layer: (s@2, s@4, s@8)}`` atomically in the official list format."""
    _strip(str(path), sensitivity)
    checked = {layer: list(_check_scores(str(path), layer, v)) for layer, v in sensitivity.items()}
    if not checked:
        raise ValueError(f"{path}: refusing to write an empty sensitivity file")
    atomic_write_text(path, _dump(checked))


def read_sizes(path: str | os.PathLike) -> dict[str, float]:
    """``{layer: relative element count}`` from an official ``tensor_ratio`` file."""
    data = _load_layer_mapping(path)
    return {layer: _check_size(str(path), layer, v) for layer, v in data.items()}


def write_sizes(path: str | os.PathLike, sizes: Mapping[str, float]) -> None:
    """Write ``{model.<layer>: size}`` (the ``tensor_ratio`` format), atomically."""
    checked = {n: _check_size(str(path), n, v) for n, v in sizes.items()}
    atomic_write_text(path, _dump(checked))


def read_layer_list(path: str | os.PathLike) -> list[str]:
    """Layer names from a YAML sequence (``- model.conv_in``); the prefix is optional here."""
    data = _load(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a YAML list of layer names, got {type(data).__name__}")
    names: list[str] = []
    for item in data:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{path}: layer {item!r} is not a name")
        name = item[len(PREFIX) :] if item.startswith(PREFIX) else item
        if name in names:
            raise ValueError(f"{path}: duplicate layer {name!r}")
        names.append(name)
    return names
