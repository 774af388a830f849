"""Testbed evaluation: generate images for a split's captions and score them with the judge.

``evaluate(pipe, ...)`` returns the metrics the issue names: ``content_score``,
``frechet_distance`` (judge features of generated vs rendered images of the same scenes),
``per_attribute`` accuracy and, given the float model's images, ``ssim_vs_fp`` and
``psnr_vs_fp``. Image ``i`` uses seed ``seed + i``, so any two models are compared on the same
noise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.testbed import data, judge, testbed_path


def load_testbed(*, steps: int = 1, **kwargs: Any):
    """The testbed pipeline: Euler-A trailing (as SDXL-turbo) or, for ``steps > 1``, LCM."""
    from mixdq_jax.api import load_pipeline  # noqa: PLC0415
    from mixdq_jax.schedulers import default_scheduler  # noqa: PLC0415

    scheduler = default_scheduler(steps, kwargs.pop("scheduler", None))
    return load_pipeline(testbed_path(), scheduler=scheduler, **kwargs)


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    metrics: dict[str, Any]
    images: np.ndarray  # [N, 64, 64, 3] in [0, 1]
    scenes: data.Scenes


def generate(
    pipe, captions, *, steps: int, seed: int = 0, batch: int = 32, qconfig: Any = None
) -> np.ndarray:
    """Images for ``captions``; caption ``i`` uses seed ``seed + i`` whatever the batching.
    ``qconfig``: run the UNet fake-quantized with it (``None``: as the pipeline is)."""
    images = []
    for start in range(0, len(captions), batch):
        chunk = list(captions[start:start + batch])
        latents = np.stack([_latents(pipe, seed + start + j) for j in range(len(chunk))])
        images.append(np.asarray(pipe(chunk, num_inference_steps=steps, guidance_scale=0.0,
                                      height=data.SIZE, width=data.SIZE, latents=latents,
                                      seed=seed + start, qconfig=qconfig)))  # fmt: skip
    return np.concatenate(images)


def _latents(pipe, seed: int) -> np.ndarray:
    import jax  # noqa: PLC0415

    from mixdq_jax.pipeline import seed_keys  # noqa: PLC0415

    factor = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, data.SIZE // factor, data.SIZE // factor)
    return np.asarray(jax.random.normal(seed_keys(seed)[0], shape))


def evaluate(
    pipe,
    *,
    split: str = "test",
    steps: int = 1,
    num: int = 256,
    seed: int = 0,
    scene_seed: int = 2024,
    reference_images: np.ndarray | None = None,
    judge_path: str | os.PathLike = judge.JUDGE_PATH,
    batch: int = 32,
    qconfig: Any = None,
) -> Evaluation:
    """Generate ``num`` images for ``split`` captions (under ``qconfig``) and score them."""
    scenes = data.sample_scenes(num, seed=scene_seed, split=split)
    images = generate(pipe, scenes.captions, steps=steps, seed=seed, batch=batch, qconfig=qconfig)
    params = judge.load_judge(judge_path)
    feats, preds = judge.read(params, images)
    real_feats, _ = judge.read(params, data.render(scenes))
    report = judge.content_score(preds, scenes)
    metrics: dict[str, Any] = {
        "split": split,
        "steps": steps,
        "num_images": num,
        "content_score": report.content_score,
        "per_attribute": report.per_attribute,
        "frechet_distance": judge.frechet_distance(feats, real_feats),
    }
    if reference_images is not None:
        from mixdq_jax.metrics import psnr, ssim_global  # noqa: PLC0415

        ref = np.asarray(reference_images, np.float32) * 255.0
        gen = images.astype(np.float32) * 255.0
        metrics["ssim_vs_fp"] = float(np.mean(ssim_global(gen, ref)))
        metrics["psnr_vs_fp"] = float(np.mean(psnr(gen, ref, axis=(-3, -2, -1))))
    return Evaluation(metrics=metrics, images=images, scenes=scenes)


def save_grid(path: str | os.PathLike, images: np.ndarray, captions, *, columns: int = 8) -> Path:
    """A PNG grid of images (upscaled 2x) with their captions underneath."""
    import io  # noqa: PLC0415
    import textwrap  # noqa: PLC0415

    from PIL import Image, ImageDraw  # noqa: PLC0415

    from mixdq_jax.io_utils import atomic_write_bytes  # noqa: PLC0415

    tile, text_h = 2 * data.SIZE, 60
    n = len(images)
    rows = max(1, -(-n // columns))
    grid = Image.new("RGB", (columns * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        grid.paste(Image.fromarray(arr).resize((tile, tile), Image.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(textwrap.wrap(caption, 21)),
                            fill="black", spacing=1)  # fmt: skip
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def bos_outlier(pipe, captions) -> dict[str, dict[str, float]]:
    """Max |activation| of token 0 (BOS) versus the other tokens, per text encoder's
    penultimate states (what SDXL feeds the UNet) and at the UNet's cross-attention inputs
    (their concatenation): the outlier MixDQ's BOS-aware quantization targets."""
    import jax.numpy as jnp  # noqa: PLC0415

    ids = pipe.tokenize(list(captions))
    out: dict[str, dict[str, float]] = {}
    states = []
    for stack, tok in zip(pipe.text, ids, strict=True):
        h = stack.model.apply({"params": pipe.params[stack.name]}, jnp.asarray(tok))
        states.append(np.asarray(h.hidden_states[-2]))
    states.append(np.concatenate(states, axis=-1))
    for name, h in zip([s.name for s in pipe.text] + ["cross_attention_input"], states,
                       strict=True):  # fmt: skip
        bos, rest = np.abs(h[:, 0]).max(), np.abs(h[:, 1:]).max()
        out[name] = {"bos_max_abs": float(bos), "other_max_abs": float(rest),
                     "ratio": float(bos / rest)}  # fmt: skip
    return out
