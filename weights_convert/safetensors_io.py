"""Read and write safetensors files with numpy alone (bf16 and fp8 included).

safetensors' own numpy API cannot return bfloat16, which real checkpoints use, so we read the
format directly: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.
Reading memory-maps the file, so a 10 GB UNet costs no copy until a tensor is used. Every
structural problem (truncation, overlapping or out-of-range offsets, unknown dtype) is an error
naming the file and the tensor.
"""

from __future__ import annotations

import json
import mmap as mmap_module
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from mixdq_jax.io_utils import atomic_open

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is corrupt, truncated or uses something we cannot read."""


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Return (tensor entries, metadata, data start offset) after validating the layout."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file too short to be safetensors ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: corrupt or truncated safetensors header (header length {n}, "
                f"file size {size})"
            )
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsError(f"{path}: safetensors header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    data_len = size - start
    spans = []
    for key, entry in header.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            lo, hi = (int(o) for o in entry["data_offsets"])
        except KeyError as err:
            if isinstance(entry, dict) and "dtype" in entry and entry["dtype"] not in _DTYPES:
                raise SafetensorsError(
                    f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']!r}"
                ) from err
            raise SafetensorsError(f"{path}: malformed header entry for tensor {key!r}") from err
        except (TypeError, ValueError) as err:
            raise SafetensorsError(f"{path}: malformed header entry for tensor {key!r}") from err
        want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if hi - lo != want or lo < 0:
            raise SafetensorsError(
                f"{path}: tensor {key!r} spans {hi - lo} bytes but {entry['dtype']}{list(shape)} "
                f"needs {want}"
            )
        if hi > data_len:
            raise SafetensorsError(
                f"{path}: truncated: tensor {key!r} ends at byte {hi} of the data section but the "
                f"file holds only {data_len} data bytes"
            )
        spans.append((lo, hi, key))
    spans.sort()
    for (_, hi_a, a), (lo_b, _, b) in zip(spans, spans[1:], strict=False):
        if lo_b < hi_a:
            raise SafetensorsError(f"{path}: tensors {a!r} and {b!r} overlap")
    return header, metadata, start


def load_safetensors(path: str | os.PathLike, *, mmap: bool = True) -> dict[str, np.ndarray]:
    """Load every tensor of a safetensors file as numpy arrays (memory-mapped by default)."""
    header, _, start = read_safetensors_header(path)
    if not header:
        return {}
    if mmap:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    else:
        buf = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
    out = {}
    for key, entry in header.items():
        lo, hi = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        arr = buf[start + lo : start + hi].view(dtype).reshape(entry["shape"])
        out[key] = arr
    return out


def release_pages(arr: np.ndarray) -> None:
    """Drop the resident pages behind a memory-mapped tensor (``madvise(MADV_DONTNEED)``).

    The mapping is read-only and file-backed, so the pages are simply read again if the array
    is used later; until then they no longer count towards the process's memory. Loading a
    model converts each tensor and releases it, so the mapped checkpoint never sits in memory
    next to the converted parameters. A no-op for arrays that are not memory-mapped.
    """
    base = arr
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    raw = getattr(base, "_mmap", None)
    if raw is None or not hasattr(raw, "madvise") or not hasattr(mmap_module, "MADV_DONTNEED"):
        return
    begin = arr.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    page = mmap_module.PAGESIZE
    lo = (begin + page - 1) // page * page  # whole pages inside this tensor only
    hi = (begin + arr.nbytes) // page * page
    if hi > lo:
        raw.madvise(mmap_module.MADV_DONTNEED, lo, hi - lo)


def save_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write tensors atomically in the safetensors format (readable by torch/safetensors)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for key in sorted(tensors):
        arr = np.asarray(tensors[key])
        arr = np.ascontiguousarray(arr).reshape(arr.shape)  # keeps 0-d arrays 0-d
        if arr.dtype not in _NAMES:
            raise SafetensorsError(f"cannot store tensor {key!r}: unsupported dtype {arr.dtype}")
        nbytes = arr.nbytes
        header[key] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with atomic_open(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    return Path(path)
