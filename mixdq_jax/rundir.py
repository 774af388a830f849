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
    RUN/configs/<name>.pareto.json   the study's Fig. 8 data (candidates and baselines)
    RUN/eval/<name>.json, .npy       metrics and images of an evaluated configuration
    RUN/report/                      the study's report
    RUN/sensitivity-nobos/           sweeps of the BOS layers with BOS handling off
    RUN/quantize/selection_float.npz float images of the held-out selection prompts
    RUN/quantize/<target>_<method>/  one `mixdq quantize` recipe: settings.json,
                                     {weight,act}_candidates.json (image MSE per candidate,
                                     written as they go), {weight,act}_bits.json (the choice),
                                     weight.yaml / act.yaml (official format), export.json,
                                     report.json, report.md
RUN/quantize/<key>/reconstruct/  learned rounding (`mixdq_jax.reconstruction`): settings.json,
                                 unit_00000.npz per finished unit (rounding bits ``up/<layer>``,
                                 learned ranges ``range/<layer>``, output MSE before/after)
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.io_utils import atomic_open, atomic_write_bytes, atomic_write_json
from mixdq_jax.official_format import write_bits

RANGE_PREFIX = "range/"
KEY_NOISE = "key_noise"
# per-batch arrays concatenated along these axes across batches (others: axis 0)
_BATCH_AXIS = {"unet_inputs": 1, "unet_outputs": 1}
_NOT_REFERENCES = ("timesteps", KEY_NOISE)


class CorruptFileError(ValueError):
    """A file of the run is truncated or damaged (disk full, a copy cut short)."""


_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def _load_npz(path: Path, *names: str) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` (all, or ``names``), or a CorruptFileError naming the file."""
    try:
        with np.load(path) as data:
            return {k: _readable(data[k]) for k in (names or data.files)}
    except FileNotFoundError:
        raise
    except _READ_ERRORS as err:
        raise CorruptFileError(
            f"{path}: corrupt or truncated ({type(err).__name__}: {err}); rerun the stage "
            "that wrote it (`mixdq calibrate` for calib/): it sets the file aside and "
            "recomputes it"
        ) from err


def _load_json(path: Path) -> Any:
    """A JSON file of the run, or a CorruptFileError naming it."""
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(
            f"{path}: corrupt or truncated JSON ({err}); restore it, or delete its folder to "
            "recompute that stage"
        ) from err


def _intact(path: Path) -> bool:
    """Whether ``path`` reads back completely (every member, CRCs checked)."""
    try:
        with np.load(path) as data:
            for k in data.files:
                data[k]
        return True
    except _READ_ERRORS:
        return False


def set_aside(path: Path) -> Path:
    """Move a corrupt file to ``<name>.corrupt`` (never deleted: it may hold something worth
    a look) and warn; the stage then recomputes it."""
    target = path.with_name(path.name + ".corrupt")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt.{n}")
        n += 1
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another process moved it first
        return target
    warnings.warn(
        f"{path} is corrupt or truncated: moved to {target.name} and recomputing it",
        stacklevel=3,
    )
    return target


def _portable(a: Any) -> np.ndarray:
    """An array as ``.npz`` can hold it: bfloat16 (and other ml_dtypes floats, which numpy
    stores as opaque bytes that load as ``V2``) widened to float32, exactly."""
    a = np.asarray(a)
    return a.astype(np.float32) if a.dtype.kind == "V" and a.dtype.names is None else a


def _readable(a: np.ndarray) -> np.ndarray:
    """A bfloat16 array written by an older version (opaque ``V2`` bytes) as float32."""
    if a.dtype.kind == "V" and a.dtype.names is None and a.dtype.itemsize == 2:
        import ml_dtypes  # noqa: PLC0415  (a dependency of jax)

        return a.view(ml_dtypes.bfloat16).astype(np.float32)
    return a


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: _portable(a) for k, a in arrays.items()})
    return buf.getvalue()


def _start(path: Path, settings: Mapping[str, Any], what: str) -> None:
    """Write a stage's settings, or check that a resumed one has the same (naming the
    changed fields)."""
    if path.is_file():
        old = _load_json(path)
        changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if changed:
            raise ValueError(
                f"{path}: {what} was started with other settings ({', '.join(changed)}); use "
                f"the same options, another --run, or delete {path.parent}"
            )
    else:
        atomic_write_json(path, dict(settings))


@dataclass(frozen=True)
class RunDir:
    """The files of one run, rooted at ``path``."""

    path: Path
    sweeps: str = "sensitivity"  # folder of the sensitivity sweeps (see `with_sensitivity`)

    def __init__(self, path: str | os.PathLike, sweeps: str = "sensitivity") -> None:
        object.__setattr__(self, "path", Path(path))
        object.__setattr__(self, "sweeps", sweeps)

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
            old = _load_json(self.calib_meta_path)
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
        return _load_json(self.calib_meta_path)

    def has_batch(self, index: int) -> bool:
        """Whether batch ``index`` is done: its file exists and reads back completely (a
        corrupt one is set aside as ``<name>.corrupt`` with a warning, so it is recomputed)."""
        path = self.batch_path(index)
        if not path.is_file():
            return False
        if _intact(path):
            return True
        set_aside(path)
        return False

    def write_batch(
        self, index: int, arrays: Mapping[str, np.ndarray], ranges: Mapping[str, np.ndarray]
    ) -> None:
        payload = dict(arrays)
        payload.update({f"{RANGE_PREFIX}{k}": np.asarray(v) for k, v in ranges.items()})
        atomic_write_bytes(self.batch_path(index), _npz_bytes(payload))

    def batch_ranges(self, index: int) -> dict[str, np.ndarray]:
        n = len(RANGE_PREFIX)
        data = _load_npz(self.batch_path(index))
        return {k[n:]: v for k, v in data.items() if k.startswith(RANGE_PREFIX)}

    def batch_arrays(self, index: int, *names: str) -> dict[str, np.ndarray]:
        """Some arrays of one batch file (``timesteps``, ``key_noise``, ...)."""
        path = self.batch_path(index)
        try:
            with np.load(path) as data:
                files = set(data.files)
        except FileNotFoundError:
            raise
        except _READ_ERRORS:
            files = None
        if files is not None:
            missing = [n for n in names if n not in files]
            if missing:
                raise ValueError(
                    f"{path}: no {', '.join(missing)} (written by an older mixdq-jax?); "
                    "calibrate again into a new --run directory"
                )
        return _load_npz(path, *names)

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
        return _load_npz(self.act_ranges_path)

    def references(self) -> dict[str, np.ndarray]:
        """Every batch's float references, concatenated along the batch axis."""
        indices = self.batch_indices()
        if not indices:
            raise FileNotFoundError(f"{self.calib_dir}: no calibration batches")
        parts: dict[str, list[np.ndarray]] = {}
        for b in indices:
            for k, v in _load_npz(self.batch_path(b)).items():
                if not k.startswith(RANGE_PREFIX) and k not in _NOT_REFERENCES:
                    parts.setdefault(k, []).append(v)
        return {k: np.concatenate(v, axis=_BATCH_AXIS.get(k, 0)) for k, v in parts.items()}

    # ------------------------------------------------------------------ sensitivity
    @property
    def sensitivity_dir(self) -> Path:
        return self.path / self.sweeps

    def sweep_dir(self, kind: str) -> Path:
        return self.sensitivity_dir / kind

    def start_sweep(self, kind: str, meta: Mapping[str, Any], *, write: bool = True) -> None:
        """Create the sweep folder of ``kind`` and its settings, or check they match."""
        folder = self.sweep_dir(kind)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "meta.json"
        if path.is_file():
            old = _load_json(path)
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
        """``{(layer, bits): value}`` of every finished chunk; a corrupt chunk is set aside
        as ``<name>.corrupt`` with a warning, so its configurations run again."""
        done: dict[tuple[str, int], float] = {}
        for path in self.chunk_paths(kind, metric):
            try:
                data = _load_npz(path, "layers", "bits", "values")
                rows = list(zip(data["layers"], data["bits"], data["values"], strict=True))
            except (CorruptFileError, ValueError):
                set_aside(path)
                continue
            for name, bits, value in rows:
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
    def pareto_path(self, name: str) -> Path:
        """The candidates behind the configuration ``name`` and their image scores."""
        return self.path / "configs" / f"{name}.pareto.json"

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

    # ------------------------------------------------------------------ recipe (`mixdq quantize`)
    def with_sensitivity(self, name: str) -> RunDir:
        """The same run with its sweeps in ``RUN/<name>/`` (e.g. a sweep of the BOS layers
        with BOS handling off); calibration is shared."""
        return RunDir(self.path, sweeps=name)

    def lowrank_dir(self, tag: str) -> Path:
        """``RUN/lowrank/<tag>/``: one low-rank format's per-layer smoothing and branch."""
        return self.path / "lowrank" / tag

    def start_lowrank(self, tag: str, settings: Mapping[str, Any]) -> None:
        """Write a low-rank search's settings, or check a resumed one has the same."""
        _start(self.lowrank_dir(tag) / "settings.json", settings, f"this run's {tag} search")

    def lowrank_layer(self, tag: str, name: str) -> dict[str, np.ndarray] | None:
        """One layer's searched arrays (``None``: not searched yet, or a damaged file,
        which the search then redoes)."""
        path = self.lowrank_dir(tag) / "layers" / f"{name}.npz"
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except FileNotFoundError:
            return None
        except _READ_ERRORS:
            return None

    def write_lowrank_layer(self, tag: str, name: str, arrays: Mapping[str, np.ndarray]) -> None:
        atomic_write_bytes(self.lowrank_dir(tag) / "layers" / f"{name}.npz", _npz_bytes(arrays))

    def recipe_dir(self, key: str) -> Path:
        """``RUN/quantize/<target>_<method>/``: one recipe's settings, candidate scores,
        chosen bits and report."""
        return self.path / "quantize" / key

    def start_recipe(self, key: str, settings: Mapping[str, Any]) -> None:
        """Write a recipe's settings, or check a resumed one has the same."""
        _start(self.recipe_dir(key) / "settings.json", settings, f"this run's {key} recipe")

    def candidate_scores_path(self, key: str, kind: str) -> Path:
        return self.recipe_dir(key) / f"{kind}_candidates.json"

    def candidate_scores(self, key: str, kind: str) -> dict[str, Any]:
        """``{"candidates": [...], "scores": {fingerprint: image MSE}}`` so far."""
        path = self.candidate_scores_path(key, kind)
        if not path.is_file():
            return {"scores": {}}
        try:
            return _load_json(path)
        except CorruptFileError:  # scores are cheap to redo: set the file aside, start over
            set_aside(path)
            return {"scores": {}}

    def write_candidate_scores(self, key: str, kind: str, payload: Mapping[str, Any]) -> None:
        atomic_write_json(self.candidate_scores_path(key, kind), dict(payload))

    def chosen_bits_path(self, key: str, kind: str) -> Path:
        return self.recipe_dir(key) / f"{kind}_bits.json"

    def chosen_bits(
        self, key: str, kind: str, layers: Sequence[str] | None = None
    ) -> dict[str, int] | None:
        """The bits a recipe stage chose (float layers at 16), or ``None`` before it ran. The
        file may be edited by hand (the plan a later stage exports): with ``layers`` (the
        model's), an unknown or missing layer or a bit-width that is no integer is a
        ``ValueError`` naming the file, the layer and what to do."""
        path = self.chosen_bits_path(key, kind)
        if not path.is_file():
            return None
        data = _load_json(path)
        fix = f"fix the file, or delete it to choose the {kind} bits again"
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of layer names to bits; {fix}")
        bad = [n for n, b in data.items() if isinstance(b, bool) or not isinstance(b, int)]
        if bad:
            raise ValueError(f"{path}: layer {bad[0]!r}: bit-width {data[bad[0]]!r} is no "
                             f"integer; {fix}")  # fmt: skip
        if layers is not None:
            unknown = sorted(set(data) - set(layers))
            missing = [n for n in layers if n not in data]
            for what, names in (("not in this model's UNet", unknown), ("missing", missing)):
                if names:
                    shown = ", ".join(repr(n) for n in names[:5])
                    more = f" (and {len(names) - 5} more)" if len(names) > 5 else ""
                    raise ValueError(f"{path}: {len(names)} layer(s) {what}: {shown}{more}; "
                                     f"{fix}")  # fmt: skip
        return {n: int(b) for n, b in data.items()}

    def write_chosen_bits(self, key: str, kind: str, bits: Mapping[str, int]) -> None:
        """Record the choice (JSON, every layer) and the official-format YAML (float layers
        absent, as the official code reads them)."""
        quantized = {n: int(b) for n, b in bits.items() if b < 16}
        if quantized:
            write_bits(self.recipe_dir(key) / f"{kind}.yaml", quantized, allowed=range(2, 9))
        atomic_write_json(self.chosen_bits_path(key, kind), {n: int(b) for n, b in bits.items()})

    def selection_reference_path(self) -> Path:
        """Float images of the held-out selection prompts (shared by every recipe)."""
        return self.path / "quantize" / "selection_float.npz"

    def selection_reference(self, prompts: Sequence[str], make: Callable[[], np.ndarray]):
        """The float images of ``prompts``, rendered once by ``make``."""
        path = self.selection_reference_path()
        if path.is_file() and not _intact(path):
            set_aside(path)
        if path.is_file():
            data = _load_npz(path, "prompts", "images")
            if list(data["prompts"]) == list(prompts):
                return data["images"]
        images = np.asarray(make())
        atomic_write_bytes(path, _npz_bytes({"prompts": np.asarray(prompts), "images": images}))
        return images

    def export_record(self, key: str) -> dict[str, Any] | None:
        """What a recipe's export stage wrote last (its folder and metadata), or ``None``."""
        path = self.recipe_dir(key) / "export.json"
        return _load_json(path) if path.is_file() else None

    def write_export_record(self, key: str, record: Mapping[str, Any]) -> None:
        atomic_write_json(self.recipe_dir(key) / "export.json", dict(record))

    def recipe_report_paths(self, key: str) -> tuple[Path, Path]:
        return self.recipe_dir(key) / "report.json", self.recipe_dir(key) / "report.md"

    def reconstruction_dir(self, key: str) -> Path:
        """``RUN/quantize/<key>/reconstruct/``: one recipe's learned rounding, unit by unit."""
        return self.recipe_dir(key) / "reconstruct"

    def start_reconstruction(self, key: str, settings: Mapping[str, Any]) -> None:
        """Write a reconstruction's settings, or check a resumed one has the same."""
        _start(self.reconstruction_dir(key) / "settings.json", settings, "this reconstruction")

    def reconstructed_unit_path(self, key: str, index: int) -> Path:
        return self.reconstruction_dir(key) / f"unit_{index:05d}.npz"

    def reconstructed_unit(self, key: str, index: int) -> dict[str, np.ndarray] | None:
        """A finished unit's arrays, or ``None`` (not yet run; a corrupt file is set aside)."""
        path = self.reconstructed_unit_path(key, index)
        if path.is_file() and not _intact(path):
            set_aside(path)
        return _load_npz(path) if path.is_file() else None

    def write_reconstructed_unit(self, key: str, index: int, arrays: Mapping[str, Any]) -> None:
        atomic_write_bytes(self.reconstructed_unit_path(key, index), _npz_bytes(arrays))


RUN_SETTINGS = "settings.json"  # `mixdq_jax.cli.config_file.SETTINGS_FILE` (the CLI's record)


def is_run_directory(path: str | os.PathLike) -> bool:
    """A folder a mixdq command made a run directory: calibrated (``calib/meta.json``, the
    first file calibration writes, or its ranges) or with the ``settings.json`` that
    ``quantize``/``demo`` write first. The one recogniser: the CLI's write policy and
    `mixdq inspect` both ask it."""
    path = Path(path)
    calib = path / "calib"
    if (calib / "meta.json").is_file() or (calib / "act_ranges.npz").is_file():
        return True
    try:
        settings = json.loads((path / RUN_SETTINGS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and settings.get("format") == "mixdq-settings"
