"""What is inside an exported folder or a run directory, read from their files alone.

`mixdq inspect` prints these summaries; they are plain dicts so scripts can read them too
(``--json``). Nothing here loads weights into JAX: an export's sizes come from the
safetensors header, its layer formats from ``unet/mixdq_quant.json``, and a run directory's
progress from which files its stages have written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

from mixdq_jax.deploy.checkpoint import is_quantized_folder, read_quant_meta, verify_export
from mixdq_jax.hub import EXPORT_SETTINGS_FILE
from mixdq_jax.rundir import is_run_directory
from weights_convert.checkpoint import read_json

_PACKED = "/q"  # packed tensors live under `<layer>/q<part>/...` in the weights file


def inspect_path(path: str | os.PathLike, *, layers: bool = False) -> dict[str, Any]:
    """The summary of an exported folder or a run directory (``kind`` says which)."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; give an exported folder or a --run directory")
    if is_quantized_folder(folder):
        return export_summary(folder, layers=layers)
    if is_run_directory(folder):
        return run_summary(folder)
    raise ValueError(
        f"{folder}: neither an exported quantized folder (no unet/mixdq_quant.json) nor a run "
        "directory (no calib/ or quantize/); give the --out of `mixdq quantize`/`mixdq export` "
        "or its --run"
    )


# ------------------------------------------------------------------------------ exports
def _safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file (names, dtypes, shapes), without the data."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file (no header); re-export it")
        (size,) = struct.unpack("<Q", raw)
        if size > path.stat().st_size:
            raise ValueError(f"{path}: corrupt safetensors header; re-export it")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _fp16_bytes(header: dict[str, Any], plan: dict[str, Any]) -> int:
    """The UNet's size with every parameter in FP16: packed layers at their float shapes,
    every other tensor as stored (biases, norms, float layers), counted at two bytes."""
    packed = {key.split(_PACKED)[0].replace("/", ".") for key in header if _PACKED in key}
    numel = sum(
        math.prod(entry["shape"]) for key, entry in header.items() if _PACKED not in key
    )
    for name in packed & set(plan):
        numel += math.prod(plan[name]["weight_shape"])
    return 2 * numel


def _bits_label(bits: Any) -> str:
    return "float" if bits is None or int(bits) >= 16 else f"{int(bits)}"


def export_summary(folder: Path, *, layers: bool = False) -> dict[str, Any]:
    """Source, method and settings, per-layer formats, sizes and a checksum verdict."""
    unet = folder / "unet"
    meta = read_quant_meta(unet)
    plan: dict[str, Any] = meta["plan"]
    weights = unet / meta["weights_file"]
    settings_path = folder / EXPORT_SETTINGS_FILE
    settings = read_json(settings_path, what="export settings") if settings_path.is_file() else {}
    options = settings.get("settings", {})
    qc = _quantization_config(unet)

    w_numel = {n: math.prod(p["weight_shape"]) for n, p in plan.items()}
    total = sum(w_numel.values()) or 1
    pairs = Counter(
        (_bits_label(p.get("w_bits")), _bits_label(p.get("a_bits"))) for p in plan.values()
    )
    mean_w = sum(w_numel[n] * min(int(p.get("w_bits") or 16), 16) for n, p in plan.items())
    summary: dict[str, Any] = {
        "kind": "export",
        "path": str(folder),
        "source": meta.get("source"),
        "method": qc.get("method") or options.get("method"),
        "preset": qc.get("preset") or options.get("preset"),
        "objective": qc.get("objective") or options.get("objective"),
        "target": qc.get("target") or options.get("target"),
        "format": meta["spec"] if "spec" in meta else None,
        "float_dtype": meta["float_dtype"],
        "layers": len(plan),
        "weight_bits_mean": mean_w / total,
        "formats": [
            {"weights": w, "acts": a, "layers": count}
            for (w, a), count in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        ],
        "sizes": _sizes(weights, plan),
        "checksums": _verify(folder),
        "settings": settings,
    }
    if layers:
        summary["per_layer"] = {
            name: {
                "kind": p.get("kind"),
                "weights": _bits_label(p.get("w_bits")),
                "acts": _bits_label(p.get("a_bits")),
                "symmetric": p.get("symmetric"),
                "bos": p.get("bos"),
                "weight_shape": p.get("weight_shape"),
            }
            for name, p in sorted(plan.items())
        }
    return summary


def _quantization_config(unet: Path) -> dict[str, Any]:
    """``unet/config.json``'s ``quantization_config`` (diffusers' convention), if any."""
    path = unet / "config.json"
    if not path.is_file():
        return {}
    config = read_json(path, what="UNet config")
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return qc if isinstance(qc, dict) else {}


def _sizes(weights: Path, plan: dict[str, Any]) -> dict[str, Any]:
    if not weights.is_file():
        return {"unet_bytes": None, "fp16_bytes": None, "ratio": None}
    stored = weights.stat().st_size
    fp16 = _fp16_bytes(_safetensors_header(weights), plan)
    return {"unet_bytes": stored, "fp16_bytes": fp16, "ratio": fp16 / stored if stored else None}


def _verify(folder: Path) -> dict[str, Any]:
    """Every file of the export against the checksums its manifest records."""
    problems = verify_export(folder)
    return {"ok": not problems, "problems": list(problems)}


# ------------------------------------------------------------------------------ runs
def _count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0


def _calibration(run: Path) -> dict[str, Any]:
    calib = run / "calib"
    if not (calib / "meta.json").is_file():
        return {"state": "not started"}
    config = read_json(calib / "meta.json", what="calibration settings").get("config", {})
    prompts = len(config.get("prompts", []))
    batch = int(config.get("batch_size") or 1)
    expected = math.ceil(prompts / batch) if prompts else None
    done = (calib / "act_ranges.npz").is_file()
    return {
        "state": "done" if done else "in progress",
        "prompts": prompts,
        "batches": _count(calib, "batch_*.npz"),
        "batches_expected": expected,
        "method": config.get("method"),
    }


def _sweeps(run: Path) -> dict[str, Any]:
    """Every sweep folder (``sensitivity`` and the variants a study writes beside it)."""
    sweeps: dict[str, Any] = {}
    for folder in sorted(p for p in run.iterdir() if p.is_dir()):
        kinds = {}
        for kind in ("weight", "act"):
            if not (folder / kind / "meta.json").is_file():
                continue
            chunks = {
                metric: _count(folder / kind, f"{metric}_*.npz") for metric in ("sqnr", "ssim")
            }
            scores = sorted(p.name for p in folder.glob(f"{kind}_*.*") if "sizes" not in p.name)
            kinds[kind] = {
                "state": "done" if scores else "in progress",
                "chunks": {m: n for m, n in chunks.items() if n},
                "scores": scores,
            }
        if kinds:
            sweeps[folder.name] = kinds
    return sweeps


def _recipes(run: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    root = run / "quantize"
    if not root.is_dir():
        return rows
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        settings = (
            read_json(folder / "settings.json", what="recipe settings")
            if (folder / "settings.json").is_file()
            else {}
        )
        method = settings.get("method", {})
        stages = {
            "weights": (folder / "weight_bits.json").is_file(),
            "acts": (folder / "act_bits.json").is_file(),
            "reconstruct": _count(folder / "reconstruct", "unit_*.npz"),
            "export": (folder / "export.json").is_file(),
            "report": (folder / "report.json").is_file(),
        }
        row: dict[str, Any] = {
            "method": method.get("name") if isinstance(method, dict) else method,
            "preset": settings.get("preset", {}).get("name")
            if isinstance(settings.get("preset"), dict)
            else settings.get("preset"),
            "objective": settings.get("knobs", {}).get("objective"),
            "stages": stages,
        }
        if stages["export"]:
            record = read_json(folder / "export.json", what="export record")
            row["out"] = record.get("out")
        if stages["report"]:
            report = read_json(folder / "report.json", what="recipe report")
            row["report"] = {
                k: report[k]
                for k in ("target", "weight_avg_bits", "act_effective_bits", "unet_mb",
                          "float_unet_mb", "psnr_vs_fp", "ssim_vs_fp")
                if k in report
            }  # fmt: skip
        rows[folder.name] = row
    return rows


def run_summary(run: Path) -> dict[str, Any]:
    """Which stages of a run directory are done and what each holds."""
    settings_path = run / "settings.json"
    return {
        "kind": "run",
        "path": str(run),
        "settings": read_json(settings_path, what="run settings")
        if settings_path.is_file()
        else {},
        "calibrate": _calibration(run),
        "sensitivity": _sweeps(run),
        "quantize": _recipes(run),
    }
