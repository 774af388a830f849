"""One evaluation as the paper runs it: generate, score, write ``DIR/metrics.json``.

``evaluate_model`` generates the images of a model (float, fake-quantized or an exported
folder) for a prompt set into ``DIR/images`` (resumable), the float model's images for the
"vs float" metrics into the cache (once per model, prompts and settings), then computes the
requested metrics and writes ``metrics.json`` after each one, so a kill during a slow metric
keeps the ones already done. Keys: ``fid``, ``clip_score`` (mean cosine, the paper's scale),
``clip_score_torchmetrics`` (``max(100 x mean, 0)``), ``imagereward``, ``lpips_vs_fp``,
``ssim_vs_fp``, ``psnr_vs_fp`` (``null`` when not asked for; PSNR is averaged over the images
that differ from the float ones, ``psnr_identical_images`` counts the others), ``compute`` and
``storage`` (`mixdq_jax.evaluation.bops`) and ``settings`` (everything needed to reproduce the
numbers).
Weights for every requested metric are checked before any image is generated.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.evaluation.coco import PromptSet
from mixdq_jax.evaluation.images import (
    GenerationSettings,
    ImageSet,
    cache_root,
    complete_set,
    describe_set,
    generate_set,
    set_key,
)
from mixdq_jax.io_utils import atomic_write_json, exclusive_lock

METRICS = ("fid", "clip", "imagereward", "lpips", "ssim", "psnr")
VS_FLOAT = ("lpips", "ssim", "psnr")
RESULT_KEYS = ("fid", "clip_score", "clip_score_torchmetrics", "imagereward", "lpips_vs_fp",
               "ssim_vs_fp", "psnr_vs_fp")  # fmt: skip
# what each metric writes: values, then settings (kept together when a rerun carries it over)
_WRITES = {
    "fid": (("fid",), ("fid_reference",)),
    "clip": (("clip_score", "clip_score_torchmetrics"), ()),
    "imagereward": (("imagereward",), ()),
    "lpips": (("lpips_vs_fp",), ("float_images",)),
    "ssim": (("ssim_vs_fp",), ("float_images",)),
    "psnr": (("psnr_vs_fp", "psnr_identical_images"), ("float_images",)),
}


def parse_metrics(text: str) -> tuple[str, ...]:
    """``"fid,clip"`` -> ``("fid", "clip")``, in the canonical order; unknown names fail."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad or not names:
        raise ValueError(f"--metrics {text!r}: choose from {','.join(METRICS)} (unknown: {bad})")
    return tuple(m for m in METRICS if m in names)


@dataclass(frozen=True, kw_only=True)
class MetricWeights:
    """Where each metric's network (and FID's real images) are on this machine."""

    inception: Path | None = None
    clip_model: Path | None = None
    imagereward: Path | None = None
    lpips: Path | None = None
    reference_images: Path | None = None


def implied_metrics(weights: MetricWeights) -> tuple[str, ...]:
    """The metrics the given weights allow: SSIM and PSNR vs float always (they need none),
    LPIPS / CLIP score / ImageReward when their network is given, FID with the Inception
    weights and the real images."""
    given = {
        "lpips": weights.lpips is not None,
        "clip": weights.clip_model is not None,
        "imagereward": weights.imagereward is not None,
        "fid": weights.inception is not None and weights.reference_images is not None,
        "ssim": True,
        "psnr": True,
    }
    return tuple(m for m in METRICS if given[m])


@dataclass(frozen=True, kw_only=True)
class ReportEval:
    """The paper's metrics in a report (`mixdq quantize`, the study): on which prompts,
    which metrics, with which weights. ``cache``: float images and FID statistics (default
    `images.cache_root`); ``identity``: what keys the model's images besides its files (a
    LoRA fused at load), so the float images of another fusion are not reused."""

    prompts: PromptSet
    metrics: tuple[str, ...]
    weights: MetricWeights = MetricWeights()
    batch: int = 8
    cache: Path | None = None
    identity: dict[str, Any] | None = None  # what else makes the model (a fused LoRA)


# how the reports show the computed metrics: key, label, decimals
REPORT_COLUMNS = (
    ("fid", "FID", 2), ("clip_score", "CLIP score", 4), ("imagereward", "ImageReward", 3),
    ("lpips_vs_fp", "LPIPS vs FP", 4), ("ssim_vs_fp", "SSIM vs FP", 4),
    ("psnr_vs_fp", "PSNR vs FP", 2),
)  # fmt: skip


def report_values(result: dict[str, Any]) -> dict[str, Any]:
    """What a report shows of `evaluate_model`'s result: the computed metrics, the number of
    prompts and where the images are."""
    values = {k: result[k] for k in RESULT_KEYS if result.get(k) is not None}
    values["prompts"] = result["settings"]["prompts"]["num"]
    return values


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    metrics: tuple[str, ...]
    weights: MetricWeights = MetricWeights()
    generation: GenerationSettings
    metric_batch: int = 16


@dataclass(frozen=True, kw_only=True)
class Subject:
    """The model under test and its float reference.

    ``identity``/``quantization`` key its image set (`images.describe_set`); ``qconfig`` is
    passed to the pipeline (fake quantization). ``load_float`` gives the float pipeline whose
    images the "vs float" metrics compare with, called only when they are not cached;
    ``None``: the model under test is the float model.
    """

    pipe: Any
    identity: dict[str, Any]
    quantization: Any
    qconfig: Any = None
    float_identity: dict[str, Any] | None = None
    load_float: Callable[[], Any] | None = None


# metric -> (module, loader, checker, MetricWeights field)
_NETWORKS = {
    "clip": ("clip_score", "load_clip_scorer", "check_clip_scorer", "clip_model"),
    "imagereward": ("image_reward", "load_image_reward", "check_image_reward", "imagereward"),
    "lpips": ("lpips", "load_lpips", "check_lpips", "lpips"),
    "fid": ("inception", "load_inception", "check_inception", "inception"),
}
_CHECKED: set[tuple[str, str, tuple]] = set()  # (metric, path, file stamps) checked this process


def _loader(metric: str, which: int = 1) -> Callable[[Any], Any]:
    module, name = _NETWORKS[metric][0], _NETWORKS[metric][which]
    return getattr(importlib.import_module(f"mixdq_jax.evaluation.{module}"), name)


def _stamp(path: Path) -> tuple:
    """What changes when the weights at ``path`` change (size and mtime of its files)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


def check_weights(metrics: Sequence[str], weights: MetricWeights) -> None:
    """Fail before generating when a requested metric's network does not load: each one is
    read and checked as its loader checks it (config, every tensor's name, shape and values;
    the weights are not kept), so a folder that is not a CLIP model or a truncated Inception
    file fails in seconds, naming the file, instead of after every image. The loaders'
    `MissingWeightsError` says what is needed and where it comes from. FID's real images
    (at least two) are listed first. A check passed in this process is not repeated while the
    files are unchanged."""
    networks = [(m, getattr(weights, _NETWORKS[m][3])) for m in metrics if m in _NETWORKS]
    done = set()
    for metric, path in networks:  # the cheap checks first: the files are there
        if path is None or not Path(path).exists():  # missing, or a cached repo id (CLIP)
            _loader(metric, 2)(path)  # raises MissingWeightsError naming the files
            done.add(metric)
    if "fid" in metrics:
        from mixdq_jax.evaluation.fid import list_images  # noqa: PLC0415

        if weights.reference_images is None:
            raise FileNotFoundError(
                "fid: needs --reference-images DIR, the real images to compare with (COCO "
                "val2014's 40,504 JPEGs from https://cocodataset.org for the paper's numbers)"
            )
        list_images(weights.reference_images)
    for metric, path in networks:  # then each network, read and checked
        if metric in done:
            continue
        key = (metric, str(path), _stamp(Path(path)))
        if key not in _CHECKED:
            _loader(metric, 2)(path)  # raises MissingWeightsError / ValueError naming files
            _CHECKED.add(key)


def _float_set(
    prompts: Sequence[str],
    request: EvalRequest,
    float_identity: dict[str, Any],
    load_float: Callable[[], Any],
    cache: Path,
    progress: bool,
) -> ImageSet:
    description = describe_set(float_identity, "float", prompts, request.generation)
    folder = cache / "float-images" / set_key(description)
    with exclusive_lock(folder, "float image cache"):
        existing = complete_set(folder, description, len(prompts))
        if existing is not None:
            return existing
        pipe = load_float()
        return generate_set(pipe, prompts, folder, settings=request.generation,
                            description=description, progress=progress)  # fmt: skip


def _mean(values: list[np.ndarray]) -> float:
    v = np.concatenate(values).astype(np.float64)
    return float(np.mean(v))


def _vs_float(metrics: Sequence[str], gen: ImageSet, ref: ImageSet, batch: int,
              lpips_path: Path | None) -> dict[str, float | None]:  # fmt: skip
    from mixdq_jax.metrics import psnr, ssim_global  # noqa: PLC0415

    net = _loader("lpips")(lpips_path) if "lpips" in metrics else None
    ssims, psnrs, dists = [], [], []
    for start, a in gen.batches(batch):
        b = ref.load(start, start + len(a))
        if a.shape != b.shape:
            raise ValueError(f"vs float: image {start} is {a.shape[1:]} here, {b.shape[1:]} "
                             "in the float set")  # fmt: skip
        fa, fb = a.astype(np.float32), b.astype(np.float32)
        if "ssim" in metrics:
            ssims.append(np.asarray(ssim_global(fa, fb)))
        if "psnr" in metrics:
            psnrs.append(np.asarray(psnr(fa, fb, axis=(-3, -2, -1))))
        if net is not None:
            dists.append(np.asarray(net.distance(a, b)))
    out: dict[str, float | None] = {}
    if ssims:
        out["ssim_vs_fp"] = _mean(ssims)
    if psnrs:  # an image identical to the float one has infinite PSNR: averaged without it
        values = np.concatenate(psnrs).astype(np.float64)
        finite = values[np.isfinite(values)]
        out["psnr_vs_fp"] = float(finite.mean()) if finite.size else None
        out["psnr_identical_images"] = int(values.size - finite.size)
    if dists:
        out["lpips_vs_fp"] = _mean(dists)
    return out


def _text_scores(metric: str, path: Path, images: ImageSet, batch: int) -> np.ndarray:
    scorer = _loader(metric)(path)
    scores = []
    for start, x in images.batches(batch):
        scores.append(np.asarray(scorer.score(x, images.prompts[start : start + len(x)])))
    return np.concatenate(scores).astype(np.float64)


def _fid(request: EvalRequest, images: ImageSet, cache: Path | None,
         progress: bool) -> tuple[float, dict]:  # fmt: skip
    from mixdq_jax.evaluation import fid, inception  # noqa: PLC0415

    path = request.weights.inception
    extract = inception.feature_extractor(path)
    gen = fid.stats_of_batches(extract, (x for _, x in images.batches(64)))
    size = (request.generation.height, request.generation.width)
    ref, record = fid.reference_stats(request.weights.reference_images, extract, size=size,
                                      weights_id=fid.weights_id(path), cache=cache,
                                      progress=progress)  # fmt: skip
    return fid.frechet_distance(gen, ref), record


def evaluate_model(
    subject: Subject,
    prompts: PromptSet,
    out: str | os.PathLike,
    *,
    request: EvalRequest,
    efficiency: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate and score; returns what ``out/metrics.json`` holds. ``efficiency``: the
    ``compute``/``storage`` entries (`bops.efficiency`); ``settings``: extra settings to record;
    ``cache``: float images and FID reference statistics (default `images.cache_root`)."""
    check_weights(request.metrics, request.weights)
    out = Path(out)
    cache = cache_root() if cache is None else Path(cache)
    texts = prompts.texts
    result: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    result.update(efficiency or {})
    result["settings"] = {
        **(settings or {}),
        "model": subject.identity.get("path"),
        "quantization": subject.quantization,
        "prompts": prompts.settings(),
        "generation": asdict(request.generation),
        "metrics": list(request.metrics),
        "weights": {k: None if v is None else str(v) for k, v in asdict(request.weights).items()},
    }
    with exclusive_lock(out, "output folder"):
        description = describe_set(subject.identity, subject.quantization, texts,
                                   request.generation)  # fmt: skip
        images = generate_set(subject.pipe, texts, out / "images", settings=request.generation,
                              description=description, qconfig=subject.qconfig,
                              progress=progress)  # fmt: skip
        atomic_write_json(out / "prompts.json", prompts.as_dicts())

        _carry_over(out / "metrics.json", result, request.metrics)

        def save() -> None:
            atomic_write_json(out / "metrics.json", result)

        save()
        wanted_vs = [m for m in request.metrics if m in VS_FLOAT]
        if wanted_vs and subject.load_float is None:
            result["settings"]["vs_fp"] = "the model is the float model: nothing to compare"
        elif wanted_vs:
            reference = _float_set(texts, request, subject.float_identity or {},
                                   subject.load_float, cache, progress)  # fmt: skip
            result["settings"]["float_images"] = str(reference.folder)
            result.update(_vs_float(wanted_vs, images, reference, request.metric_batch,
                                    request.weights.lpips))  # fmt: skip
            save()
        if "clip" in request.metrics:
            cos = _text_scores("clip", request.weights.clip_model, images, request.metric_batch)
            result["clip_score"] = float(cos.mean())
            result["clip_score_torchmetrics"] = max(100.0 * float(cos.mean()), 0.0)
            save()
        if "imagereward" in request.metrics:
            scores = _text_scores("imagereward", request.weights.imagereward, images,
                                  request.metric_batch)  # fmt: skip
            result["imagereward"] = float(scores.mean())
            save()
        if "fid" in request.metrics:
            result["fid"], result["settings"]["fid_reference"] = _fid(request, images, cache,
                                                                      progress)  # fmt: skip
            save()
    return result


def _carry_over(path: Path, result: dict[str, Any], metrics: Sequence[str]) -> None:
    """Keep the metrics an earlier run on the same images computed and this one does not
    (the images are the same: `generate_set` checked their description)."""
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        done = [m for m in previous["settings"]["metrics"] if m in METRICS and m not in metrics]
    except (OSError, ValueError, KeyError, TypeError):
        return
    settings = result["settings"]
    for metric in done:
        values, extra = _WRITES[metric]
        for key in values:
            result[key] = previous.get(key)
        for key in extra:
            if key in previous["settings"]:
                settings.setdefault(key, previous["settings"][key])
        fields = (_NETWORKS[metric][3],) if metric in _NETWORKS else ()
        for field in fields + (("reference_images",) if metric == "fid" else ()):
            settings["weights"][field] = previous["settings"].get("weights", {}).get(field)
    settings["metrics"] = [m for m in METRICS if m in metrics or m in done]


__all__ = [
    "METRICS",
    "REPORT_COLUMNS",
    "RESULT_KEYS",
    "EvalRequest",
    "MetricWeights",
    "ReportEval",
    "Subject",
    "check_weights",
    "evaluate_model",
    "implied_metrics",
    "parse_metrics",
    "report_values",
]
