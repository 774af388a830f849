"""The testbed's judge: a small classifier that reads a scene's attributes back from its image.

It classifies each of the 9 grid cells (shape or empty, colour, size) from a 22x22 crop and the
background from all cells together. Its two metrics stand in for CLIP score and FID:

- ``content_score``: the fraction of the attributes a caption asserts that the judge finds in
  the image (the object's presence, shape, colour and size at its cell; the background).
- ``frechet_distance``: the Frechet distance between Gaussians fitted to the judge's features
  (the 9 cell embeddings concatenated) of two image sets.

The trained weights ship with the package (``assets/judge.safetensors``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from mixdq_jax.testbed import data
from weights_convert.safetensors_io import load_safetensors, save_safetensors

JUDGE_PATH = Path(__file__).parent / "assets" / "judge.safetensors"
CROP = 22
CROP_STARTS = (0, 21, 42)
EMBED_DIM = 16
ATTRIBUTES = ("background", "position", "shape", "colour", "size")


class CellNet(nn.Module):
    """22x22 crop -> (embedding [EMBED_DIM], shape/colour/size logits)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv0")(x))  # 11x11
        x = nn.relu(nn.Conv(32, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2, name="conv2")(x))  # 6x6
        x = nn.relu(nn.Dense(64, name="hidden")(x.reshape(x.shape[0], -1)))
        embed = nn.Dense(EMBED_DIM, name="embed")(x)
        h = nn.relu(embed)
        logits = {
            "shape": nn.Dense(1 + len(data.SHAPES), name="shape")(h),
            "colour": nn.Dense(len(data.COLOURS), name="colour")(h),
            "size": nn.Dense(len(data.SIZES), name="size")(h),
        }
        return embed, logits


class Judge(nn.Module):
    """Images [B, 64, 64, 3] in [0, 1] -> (features [B, 9 * EMBED_DIM], logits per attribute).

    Cell logits are [B, 9, classes]; ``background`` is [B, 4].
    """

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        b = images.shape[0]
        x = images * 2.0 - 1.0
        crops = jnp.stack(
            [x[:, r:r + CROP, c:c + CROP] for r in CROP_STARTS for c in CROP_STARTS], axis=1
        ).reshape(b * 9, CROP, CROP, 3)
        embed, cell = CellNet(name="cell")(crops)
        logits = {k: v.reshape(b, 9, -1) for k, v in cell.items()}
        features = embed.reshape(b, 9 * EMBED_DIM)
        # The background from every cell's embedding plus the image's mean colour.
        bg_in = jnp.concatenate([nn.relu(features), x.mean(axis=(1, 2))], axis=-1)
        logits["background"] = nn.Dense(len(data.BACKGROUNDS), name="background")(bg_in)
        return features, logits


# ------------------------------------------------------------------------------ weights
def save_judge(params: Mapping, path: str | os.PathLike = JUDGE_PATH) -> Path:
    flat = traverse_util.flatten_dict(jax.device_get(params), sep=".")
    return save_safetensors(path, {k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_judge(path: str | os.PathLike = JUDGE_PATH) -> dict:
    flat = load_safetensors(path, mmap=False)
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep=".")


# ------------------------------------------------------------------------------ reading
@jax.jit
def _predict(params, images):
    features, logits = Judge().apply({"params": params}, images)
    return features, {k: jnp.argmax(v, axis=-1) for k, v in logits.items()}


def read(params: Mapping, images: np.ndarray, *, batch: int = 256) -> tuple[np.ndarray, dict]:
    """(features [B, 144], predictions: per-cell ``shape``/``colour``/``size`` [B, 9] and
    ``background`` [B]) for images [B, 64, 64, 3] in [0, 1]."""
    feats, preds = [], []
    for i in range(0, len(images), batch):
        f, p = _predict(params, jnp.asarray(images[i:i + batch], jnp.float32))
        feats.append(np.asarray(f))
        preds.append(jax.tree.map(np.asarray, p))
    return np.concatenate(feats), {k: np.concatenate([p[k] for p in preds]) for k in preds[0]}


@dataclass(frozen=True, kw_only=True)
class ContentReport:
    """Content score and the fraction found per attribute kind (over all captions)."""

    content_score: float
    per_attribute: dict[str, float]
    per_image: np.ndarray  # [B] fraction of each caption's attributes found


def content_score(predictions: Mapping[str, np.ndarray], scenes: data.Scenes) -> ContentReport:
    """Compare the judge's reading of generated images with what their captions assert."""
    found = {a: [0, 0] for a in ATTRIBUTES}
    per_image = []
    for i, attrs in enumerate(data.caption_attributes(scenes)):
        hits = 0
        for name, cell, value in attrs:
            if name == "background":
                ok = predictions["background"][i] == value
            elif name == "position":
                ok = predictions["shape"][i, cell] != 0
            else:
                ok = predictions[name][i, cell] == value and predictions["shape"][i, cell] != 0
            hits += bool(ok)
            found[name][0] += bool(ok)
            found[name][1] += 1
        per_image.append(hits / len(attrs))
    total_hits = sum(v[0] for v in found.values())
    total = sum(v[1] for v in found.values())
    return ContentReport(
        content_score=total_hits / total,
        per_attribute={k: v[0] / v[1] for k, v in found.items() if v[1]},
        per_image=np.asarray(per_image),
    )


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (as FID)."""
    from scipy import linalg  # noqa: PLC0415

    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as pytorch-fid
        eps = np.eye(a.shape[1]) * 1e-6
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def accuracy(predictions: Mapping[str, np.ndarray], scenes: data.Scenes) -> dict[str, float]:
    """Per-attribute accuracy of the judge against the true labels of rendered scenes."""
    labels = scenes.cell_labels()
    occupied = labels["shape"] > 0
    return {
        "background": float((predictions["background"] == labels["background"]).mean()),
        "shape": float((predictions["shape"] == labels["shape"]).mean()),
        "colour": float((predictions["colour"] == labels["colour"])[occupied].mean()),
        "size": float((predictions["size"] == labels["size"])[occupied].mean()),
    }


# ------------------------------------------------------------------------------ training
def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise and blur, so the judge also reads imperfect generated images."""
    n = len(images)
    out = images.copy()
    blur = rng.random(n) < 0.5
    if blur.any():
        x = out[blur]
        p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        box = sum(p[:, i:i + 64, j:j + 64] for i in range(3) for j in range(3)) / 9.0
        out[blur] = box
    sigma = rng.uniform(0.0, 0.08, (n, 1, 1, 1)).astype(np.float32)
    out = out + sigma * rng.standard_normal(out.shape, dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def _loss(params, images, labels):
    _, logits = Judge().apply({"params": params}, images)
    total = optax.softmax_cross_entropy_with_integer_labels(
        logits["background"], labels["background"]).mean()  # fmt: skip
    total += optax.softmax_cross_entropy_with_integer_labels(
        logits["shape"], labels["shape"]).mean()  # fmt: skip
    for k in ("colour", "size"):
        mask = labels[k] >= 0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[k], jnp.maximum(labels[k], 0))
        total += jnp.sum(ce * mask) / jnp.maximum(mask.sum(), 1)
    return total


def train_step(opt, params, state, images, labels):
    """One optimizer step on a batch of (augmented) renders and their cell labels."""
    loss, grads = jax.value_and_grad(_loss)(params, images, labels)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


def init_params(seed: int = 0) -> dict:
    return Judge().init(jax.random.key(seed), jnp.zeros((1, 64, 64, 3)))["params"]


def train_judge(
    *, steps: int = 800, batch: int = 32, seed: int = 0, lr: float = 2e-3, progress=None
) -> tuple[dict, list[float]]:
    """Train on fresh renders of all splits (the judge must read every combination)."""
    params = init_params(seed)
    opt = optax.adamw(optax.cosine_onecycle_schedule(steps, lr, pct_start=0.1))
    state = opt.init(params)
    step_fn = jax.jit(partial(train_step, opt))
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        split = data.SPLITS[step % 3]
        scenes = data.sample_scenes(batch, seed=seed * 1_000_003 + step, split=split)
        images = augment(data.render(scenes), rng)
        labels = {k: jnp.asarray(v) for k, v in scenes.cell_labels().items()}
        params, state, loss = step_fn(params, state, jnp.asarray(images), labels)
        losses.append(float(loss))
        if progress is not None:
            progress(step, losses[-1])
    return params, losses
