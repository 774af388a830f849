"""Tuned GEMM tiles per GPU generation: data measured on the GPU, consulted by the GEMM wrappers.

`benchmarks/gpu_check.py` times a few `GemmTiles` candidates per SDXL GEMM shape on the GPU
(a bounded autotune) and writes the winners as one JSON file per device kind,
``pallas_kernels/tuned/<slug>.json`` (``slug`` = `device_kind_slug` of
``jax.devices()[0].device_kind``, e.g. ``"NVIDIA H200"`` -> ``nvidia_h200.json``)::

    {"schema": 1, "device_kind": "NVIDIA H200",
     "entries": [{"m": 1024, "k": 640, "n": 640, "wbits": 8,
                  "tiles": {"block_m": 128, "block_n": 128, "block_k": 64,
                            "num_warps": 4, "num_stages": 3},
                  "ms": 0.011, "default_ms": 0.014}, ...],
     ...provenance (jax_version, created, budget_s): ignored here}

`int8_matmul`, `w4a8_matmul` (and `int8_conv2d` through them) consult it only when
``tiles is None``, the backend is "pallas", the kernel is compiled (not interpret mode) and
JAX's default backend is a GPU (`gemm_tiles`); everywhere else, and when no file or no entry
fits, the `GemmTiles` defaults apply as before. Tiles never change a result (every tile size
gives the same codes bit for bit), so a lookup can only change speed.

Lookup (`tuned_tiles`): the entry with the same (K, N, wbits) whose M is closest on a log2
scale, if within a factor of `MAX_M_RATIO`; else None. The directory is this package's
``tuned/`` folder, or ``$PALLAS_KERNELS_TUNED_DIR`` (set it to ``""`` or ``off`` to disable
tuned tiles). Files are re-read when they change (cached by path, mtime and size); a malformed
file is reported once as a warning and ignored.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax

from pallas_kernels.backend import on_gpu
from pallas_kernels.config import GemmTiles, resolve_tiles

SCHEMA = 1
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
ENV_DIR = "PALLAS_KERNELS_TUNED_DIR"
MAX_M_RATIO = 4.0
"""An entry tuned at M serves rows in [M / 4, 4 M] (same K, N, wbits)."""


def device_kind_slug(device_kind: str) -> str:
    """File stem for a device kind: lower case, runs of other characters -> ``_``."""
    slug = re.sub(r"[^a-z0-9]+", "_", device_kind.strip().lower()).strip("_")
    return slug or "unknown"


def tuned_dir() -> Path | None:
    """``$PALLAS_KERNELS_TUNED_DIR`` if set (None for ``""`` / ``off``), else `TUNED_DIR`."""
    value = os.environ.get(ENV_DIR)
    if value is None:
        return TUNED_DIR
    if value.strip().lower() in ("", "off", "none", "0"):
        return None
    return Path(value)


def default_device_kind() -> str:
    return str(jax.devices()[0].device_kind)


def tuned_file(device_kind: str | None = None, directory: str | Path | None = None) -> Path | None:
    """Path of the tuned-tiles file for ``device_kind`` (default: the first JAX device's), or
    None when tuned tiles are disabled. The file need not exist."""
    folder = tuned_dir() if directory is None else Path(directory)
    if folder is None:
        return None
    kind = default_device_kind() if device_kind is None else device_kind
    return folder / f"{device_kind_slug(kind)}.json"


def tiles_to_dict(tiles: GemmTiles) -> dict[str, Any]:
    return dataclasses.asdict(tiles)


def tiles_from_dict(d: dict[str, Any]) -> GemmTiles:
    """A validated `GemmTiles` from a JSON object (unknown keys are an error)."""
    return GemmTiles(**d)


@functools.lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, size: int) -> tuple[tuple[int, int, int, int, GemmTiles], ...]:
    del mtime_ns, size  # cache keys only: a rewritten file is read again
    try:
        data = json.loads(Path(path).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {SCHEMA}")
        return tuple(
            (int(e["m"]), int(e["k"]), int(e["n"]), int(e.get("wbits", 8)),
             tiles_from_dict(e["tiles"]))
            for e in data["entries"]
        )
    except Exception as err:  # a bad file must never break a kernel call
        warnings.warn(f"ignoring tuned tiles file {path}: {err}", stacklevel=3)
        return ()


def load_entries(path: str | Path) -> tuple[tuple[int, int, int, int, GemmTiles], ...]:
    """``(m, k, n, wbits, tiles)`` of a tuned file; ``()`` if absent or malformed."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return ()
    return _load(str(path), st.st_mtime_ns, st.st_size)


def tuned_tiles(
    m: int,
    k: int,
    n: int,
    device_kind: str | None = None,
    *,
    wbits: int = 8,
    directory: str | Path | None = None,
) -> GemmTiles | None:
    """Tuned tiles for an (M, K) x (K, N) GEMM with ``wbits`` weights (8, 4 or 2; K counts
    unpacked rows) on ``device_kind``, or None (no file, or no entry with this K, N, wbits and
    an M within a factor of `MAX_M_RATIO`)."""
    path = tuned_file(device_kind, directory)
    if path is None:
        return None
    best, best_dist = None, math.log2(MAX_M_RATIO)
    for em, ek, en, ewbits, tiles in load_entries(path):
        if (ek, en, ewbits) != (k, n, wbits) or em < 1 or m < 1:
            continue
        dist = abs(math.log2(m) - math.log2(em))
        if dist <= best_dist:
            best, best_dist = tiles, dist
    return best


def gemm_tiles(
    tiles: GemmTiles | None, m: int, k: int, n: int, *, wbits: int, backend: str, interpret: bool
) -> GemmTiles:
    """The tiles a GEMM wrapper runs with: ``tiles`` if given; tuned tiles when ``None`` and the
    Pallas kernel is compiled on a GPU and a tuned entry fits; else the `GemmTiles` defaults."""
    if tiles is None and backend == "pallas" and not interpret and on_gpu():
        tiles = tuned_tiles(m, k, n, wbits=wbits)
    return resolve_tiles(tiles, GemmTiles)


def write_tuned(path: str | Path, device_kind: str, entries: list[dict[str, Any]],
                **provenance: Any) -> Path:
    """Writes a tuned-tiles file atomically. ``entries``: dicts with m, k, n, wbits, tiles (a
    `GemmTiles` or its dict) and any extra fields (timings); each tiles value is validated."""
    rows = []
    for e in entries:
        tiles = e["tiles"]
        tiles = tiles if isinstance(tiles, GemmTiles) else tiles_from_dict(tiles)
        rows.append({**e, "tiles": tiles_to_dict(tiles)})
    doc = {"schema": SCHEMA, "device_kind": device_kind, **provenance, "entries": rows}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
