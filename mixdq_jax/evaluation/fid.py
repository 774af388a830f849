"""Frechet Inception Distance as pytorch-fid and torchmetrics compute it.

``FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))`` over 2048-d Inception pool
features (`mixdq_jax.evaluation.inception`), with the sample covariance (``N - 1``) and
``scipy.linalg.sqrtm`` in float64; a singular product gets pytorch-fid's ``1e-6`` diagonal
offset. Statistics of the real images (COCO val2014) are cached: 40,504 images take longer to
featurise than most evaluations take to generate.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixdq_jax.io_utils import atomic_open

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass(frozen=True, kw_only=True)
class FeatureStats:
    """Mean and sample covariance of a set's features."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int


class StatsAccumulator:
    """Running sums in float64, so a set never has to be in memory at once."""

    def __init__(self, dim: int):
        self.n = 0
        self.total = np.zeros(dim, np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def add(self, feats: np.ndarray) -> None:
        f = np.asarray(feats, np.float64)
        self.n += len(f)
        self.total += f.sum(axis=0)
        self.outer += f.T @ f

    def stats(self) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return FeatureStats(mu=mu, sigma=sigma, count=self.n)


def feature_stats(feats: np.ndarray) -> FeatureStats:
    acc = StatsAccumulator(np.shape(feats)[-1])
    acc.add(feats)
    return acc.stats()


def frechet_distance(a: FeatureStats, b: FeatureStats, *, eps: float = 1e-6) -> float:
    """The Frechet distance between two Gaussians (pytorch-fid's recipe)."""
    from scipy import linalg  # noqa: PLC0415

    diff = a.mu - b.mu
    covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"FID: imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm(S1 S2); "
                "the sets are too small or degenerate for 2048-d statistics"
            )
        covmean = covmean.real
    value = diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean)
    return float(value)


def stats_of_batches(extract: Callable[[np.ndarray], np.ndarray],
                     batches: Iterable[np.ndarray]) -> FeatureStats:  # fmt: skip
    acc = None
    for images in batches:
        feats = extract(images)
        acc = acc or StatsAccumulator(feats.shape[-1])
        acc.add(feats)
    if acc is None:
        raise ValueError("FID: no images")
    return acc.stats()


# ------------------------------------------------------------------------------ real images
def list_images(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--reference-images {folder}: no such folder (the real images FID compares with, "
            "e.g. COCO val2014's 40,504 JPEGs from https://cocodataset.org)"
        )
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(
            f"--reference-images {folder}: found {len(files)} image file(s) "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}); FID needs at least 2 (a covariance), and "
            "thousands for a meaningful number (the paper: COCO val2014's 40,504)"
        )
    return files


def load_reference_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A real image as the generated ones are: RGB, center-cropped square, resized to
    ``size`` (H, W) with PIL's bicubic filter (the usual COCO FID protocol)."""
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        img = img.resize((size[1], size[0]), Image.BICUBIC)
        return np.asarray(img, np.uint8)


def reference_stats(
    folder: str | os.PathLike,
    extract: Callable[[np.ndarray], np.ndarray],
    *,
    size: tuple[int, int],
    weights_id: str,
    cache: Path | None,
    batch: int = 64,
    progress: bool = True,
) -> tuple[FeatureStats, dict]:
    """Statistics of the real images in ``folder`` (cached under ``cache`` by the file list,
    the size and the Inception weights); returns them and a record of what was used."""
    files = list_images(folder)
    listing = [(p.name, p.stat().st_size) for p in files]
    key_src = json.dumps({"files": listing, "size": list(size), "weights": weights_id})
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    record = {
        "folder": str(Path(folder).resolve()),
        "images": len(files),
        "size": list(size),
        "preprocess": "RGB, center crop to square, PIL bicubic resize",
        "key": key,
    }
    path = None if cache is None else cache / "fid-reference" / f"{key}.npz"
    if path is not None and path.is_file():
        with np.load(path) as data:
            return FeatureStats(mu=data["mu"], sigma=data["sigma"], count=int(data["count"])), {
                **record, "cached": str(path)}  # fmt: skip

    def batches():
        it = range(0, len(files), batch)
        if progress:
            from tqdm import tqdm  # noqa: PLC0415

            it = tqdm(it, desc="FID reference features", unit="batch")
        for start in it:
            yield np.stack([load_reference_image(p, size) for p in files[start : start + batch]])

    stats = stats_of_batches(extract, batches())
    if path is not None:
        with atomic_open(path) as f:
            np.savez(f, mu=stats.mu, sigma=stats.sigma, count=stats.count)
        record["cached"] = str(path)
    return stats, record


def weights_id(path: str | os.PathLike) -> str:
    """The weights' identity for the cache: name, size and a digest of the first megabyte."""
    path = Path(path)
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
    return f"{path.name}:{path.stat().st_size}:{head}"


__all__ = [
    "FeatureStats",
    "StatsAccumulator",
    "feature_stats",
    "frechet_distance",
    "list_images",
    "load_reference_image",
    "reference_stats",
    "stats_of_batches",
    "weights_id",
]
