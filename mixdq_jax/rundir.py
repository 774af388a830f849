"""A run directory: the one type that owns every path and file format of a MixDQ run.

Calibration, sensitivity sweeps, allocation, evaluation and the study read and write through
:class:`RunDir`; no other module builds a path inside a run. Every file is written atomically
(temp file, then rename), so a killed stage leaves either the old file or the new one, and a
resumed stage finds exactly what finished::

    RUN/calib/meta.json              calibration settings (a resumed run must match them)
    RUN/calib/batch_00000.npz        per batch: latents, conditioning, per-step UNet inputs and
                                     float outputs, float images, the step-noise key, and that
                                     batch's activation ranges (``range/<layer>``, [parts, 2])
    RUN/calib/act_ranges.npz         ranges accumulated over all batches (written last)
    RUN/sensitivity/<kind>/meta.json quantizer settings of a sweep
    RUN/sensitivity/<kind>/<metric>_00000.npz   finished chunks (layers, bits, values)
    RUN/sensitivity/<kind>_<metric>.yaml        scores, official format (.json for other bits)
    RUN/sensitivity/<kind>_sizes.yaml           layer sizes of the run's model (allocation)
    RUN/configs/<name>.yaml          bit-width configurations (official format)
    RUN/configs/<name>.pareto.json   the candidates a configuration was picked from
    RUN/eval/<name>.json, .npy       metrics and images of an evaluated configuration
    RUN/report/                      the study's report
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.io_utils import atomic_open, atomic_write_bytes, atomic_write_json
from mixdq_jax.official_format import read_bits, write_bits

RANGE_PREFIX = "range/"
KEY_NOISE = "key_noise"
# per-batch arrays concatenated along these axes across batches (others: axis 0)
_BATCH_AXIS = {"unet_inputs": 1, "unet_outputs": 1}
_NOT_REFERENCES = ("timesteps", KEY_NOISE)


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclass(frozen=True)
class RunDir:
    """The files of one run, rooted at ``path``."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    # ------------------------------------------------------------------ calibration
    @property
    def calib_dir(self) -> Path:
        return self.path / "calib"

    @property
    def calib_meta_path(self) -> Path:
        return self.calib_dir / "meta.json"

    @property
    def act_ranges_path(self) -> Path:
        return self.calib_dir / "act_ranges.npz"

    def batch_path(self, index: int) -> Path:
        return self.calib_dir / f"batch_{index:05d}.npz"

    def start_calibration(self, meta: Mapping[str, Any]) -> None:
        """Create ``calib/`` and its settings, or check a resumed run has the same ones."""
        self.calib_dir.mkdir(parents=True, exist_ok=True)
        if self.calib_meta_path.is_file():
            old = json.loads(self.calib_meta_path.read_text())
            if old.get("config") != meta["config"]:
                raise ValueError(
                    f"{self.calib_meta_path}: this run directory was calibrated with other "
                    "settings; use a new --run directory (or delete the old calib/ folder)"
                )
        else:
            atomic_write_json(self.calib_meta_path, dict(meta))

    def calib_meta(self) -> dict[str, Any]:
        if not self.calib_meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path}: not a calibrated run directory (no calib/meta.json); run "
                f"`mixdq calibrate --model MODEL --run {self.path}` first"
            )
        return json.loads(self.calib_meta_path.read_text())

    def has_batch(self, index: int) -> bool:
        return self.batch_path(index).is_file()

    def write_batch(
        self, index: int, arrays: Mapping[str, np.ndarray], ranges: Mapping[str, np.ndarray]
    ) -> None:
        payload = dict(arrays)
        payload.update({f"{RANGE_PREFIX}{k}": np.asarray(v) for k, v in ranges.items()})
        atomic_write_bytes(self.batch_path(index), _npz_bytes(payload))

    def batch_ranges(self, index: int) -> dict[str, np.ndarray]:
        with np.load(self.batch_path(index)) as data:
            n = len(RANGE_PREFIX)
            return {k[n:]: data[k] for k in data.files if k.startswith(RANGE_PREFIX)}

    def batch_arrays(self, index: int, *names: str) -> dict[str, np.ndarray]:
        """Some arrays of one batch file (``timesteps``, ``key_noise``, ...)."""
        path = self.batch_path(index)
        with np.load(path) as data:
            missing = [n for n in names if n not in data.files]
            if missing:
                raise ValueError(
                    f"{path}: no {', '.join(missing)} (written by an older mixdq-jax?); "
                    "calibrate again into a new --run directory"
                )
            return {n: data[n] for n in names}

    def batch_indices(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.calib_dir.glob("batch_*.npz"))

    def write_act_ranges(self, ranges: Mapping[str, np.ndarray]) -> None:
        atomic_write_bytes(self.act_ranges_path, _npz_bytes(ranges))

    def act_ranges(self) -> dict[str, np.ndarray]:
        """The accumulated activation ranges (``[parts, 2]`` per layer)."""
        if not self.act_ranges_path.is_file():
            raise FileNotFoundError(
                f"{self.act_ranges_path}: no calibration ranges; run "
                f"`mixdq calibrate --run {self.path}` first"
            )
        with np.load(self.act_ranges_path) as data:
            return {k: data[k] for k in data.files}

    def references(self) -> dict[str, np.ndarray]:
        """Every batch's float references, concatenated along the batch axis."""
        indices = self.batch_indices()
        if not indices:
            raise FileNotFoundError(f"{self.calib_dir}: no calibration batches")
        parts: dict[str, list[np.ndarray]] = {}
        for b in indices:
            with np.load(self.batch_path(b)) as data:
                for k in data.files:
                    if not k.startswith(RANGE_PREFIX) and k not in _NOT_REFERENCES:
                        parts.setdefault(k, []).append(data[k])
        return {k: np.concatenate(v, axis=_BATCH_AXIS.get(k, 0)) for k, v in parts.items()}

    # ------------------------------------------------------------------ sensitivity
    @property
    def sensitivity_dir(self) -> Path:
        return self.path / "sensitivity"

    def sweep_dir(self, kind: str) -> Path:
        return self.sensitivity_dir / kind

    def start_sweep(self, kind: str, meta: Mapping[str, Any], *, write: bool = True) -> None:
        """Create the sweep folder of ``kind`` and its settings, or check they match."""
        folder = self.sweep_dir(kind)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "meta.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != meta:
                raise ValueError(
                    f"{path}: this run's sweep was started with other quantizer settings or "
                    f"another calibration ({old} vs {meta}); delete {folder} or use a new "
                    "--run directory"
                )
        elif write:
            atomic_write_json(path, dict(meta))

    def chunk_paths(self, kind: str, metric: str) -> list[Path]:
        return sorted(self.sweep_dir(kind).glob(f"{metric}_*.npz"))

    def next_chunk_number(self, kind: str, metric: str) -> int:
        paths = self.chunk_paths(kind, metric)
        return 1 + max((int(p.stem.split("_")[-1]) for p in paths), default=-1)

    def read_chunks(self, kind: str, metric: str) -> dict[tuple[str, int], float]:
        """``{(layer, bits): value}`` of every finished chunk."""
        done: dict[tuple[str, int], float] = {}
        for path in self.chunk_paths(kind, metric):
            with np.load(path) as data:
                for name, bits, value in zip(
                    data["layers"], data["bits"], data["values"], strict=True
                ):
                    done[str(name), int(bits)] = float(value)
        return done

    def write_chunk(
        self,
        kind: str,
        metric: str,
        number: int,
        tasks: Sequence[tuple[str, int]],
        values: np.ndarray,
    ) -> None:
        with atomic_open(self.sweep_dir(kind) / f"{metric}_{number:05d}.npz") as f:
            np.savez(
                f,
                layers=np.asarray([t[0] for t in tasks]),
                bits=np.asarray([t[1] for t in tasks], np.int32),
                values=np.asarray(values, np.float64),
            )

    def sizes_path(self, kind: str) -> Path:
        """Per-layer sizes of the run's model (official ``tensor_ratio`` format)."""
        return self.sensitivity_dir / f"{kind}_sizes.yaml"

    def scores_path(self, kind: str, metric: str, *, official: bool) -> Path:
        """``<kind>_<metric>.yaml`` for the official bit set, ``.json`` otherwise."""
        return self.sensitivity_dir / f"{kind}_{metric}.{'yaml' if official else 'json'}"

    # ------------------------------------------------------------------ configurations
    def config_path(self, name: str) -> Path:
        return self.path / "configs" / f"{name}.yaml"

    def pareto_path(self, name: str) -> Path:
        """The candidates behind the configuration ``name`` and their image scores."""
        return self.path / "configs" / f"{name}.pareto.json"

    def cached_bits(self, name: str, make: Callable[[], Mapping[str, int]]) -> dict[str, int]:
        """The configuration ``name``, computed by ``make`` and written the first time."""
        path = self.config_path(name)
        if path.is_file():
            return read_bits(path)
        bits = dict(make())
        write_bits(path, bits)
        return bits

    # ------------------------------------------------------------------ evaluation
    def eval_paths(self, name: str) -> tuple[Path, Path]:
        """``(metrics json, images npy)`` of an evaluated configuration."""
        folder = self.path / "eval"
        return folder / f"{name}.json", folder / f"{name}.npy"

    def cached_eval(self, name: str, make: Callable[[], Any]) -> dict[str, Any]:
        """``{"metrics", "images"}`` of ``name``; ``make()`` returns an object with
        ``.metrics`` and ``.images`` and runs only when either file is missing."""
        path, img_path = self.eval_paths(name)
        if path.is_file() and img_path.is_file():
            return {"metrics": json.loads(path.read_text()), "images": np.load(img_path)}
        out = make()
        img_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(img_path) as f:
            np.save(f, out.images)
        atomic_write_json(path, out.metrics)
        return {"metrics": out.metrics, "images": out.images}

    @property
    def report_dir(self) -> Path:
        return self.path / "report"
