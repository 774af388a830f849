"""Generated image sets on disk: written as they are made, resumable, cached for the float model.

`write_images` is the one resumable image writer (`generate_set` here, ``mixdq generate``):
records ``{"file", "prompt", "seed"}`` (`plan_images`) rendered batch by batch, each PNG
written atomically, an index of the finished ones kept by the caller's ``write_index``.

A set is a folder ``images/`` holding ``NNNNN.png`` (uint8 RGB), ``index.json`` (a list of
``{"file", "prompt", "seed"}``, one per finished image, in prompt order) and ``set.json`` (what
the set is: model identity, quantization, prompts digest and generation settings). Image ``i``
starts from the latents of seed ``seed + i`` (the draw ``pipe(prompt, seed=seed + i)`` makes),
so any two models are compared on the same noise. A killed run resumes after the last image
listed in ``index.json``; a resumed set whose description changed is refused, naming the field.

The float model's images, needed by the "vs float" metrics of every quantized model, live in a
cache folder keyed by the digest of that description, so evaluating W8A8 and W4A8 on the same
prompts generates them once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.io_utils import atomic_write_bytes, atomic_write_json

INDEX = "index.json"
DESCRIPTION = "set.json"
SMALL_INDEX = 2000  # entries; a larger index.json is rewritten at most every flush_seconds


@dataclass(frozen=True, kw_only=True)
class GenerationSettings:
    """How images are generated. ``batch`` is part of the result for multi-step samplers
    (a batch shares one step-noise key), so it is recorded and must match on resume."""

    steps: int = 1
    seed: int = 0
    height: int
    width: int
    guidance_scale: float = 0.0
    batch: int = 8

    def __post_init__(self) -> None:
        for key in ("steps", "height", "width", "batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"GenerationSettings.{key} must be >= 1, got {getattr(self, key)}")


def prompts_digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest()


def model_fingerprint(folder: str | os.PathLike) -> dict[str, Any]:
    """What identifies a model folder for the cache: its path and the size and modification
    time of every weights file (a re-export or new checkpoint at the same path is a new key)."""
    folder = Path(folder).resolve()
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".safetensors", ".bin", ".msgpack", ".json"):
            st = path.stat()
            files[str(path.relative_to(folder))] = [st.st_size, st.st_mtime_ns]
    return {"path": str(folder), "files": files}


def describe_set(
    model: dict[str, Any], quantization: Any, prompts: Sequence[str], settings: GenerationSettings
) -> dict[str, Any]:
    return {
        "model": model,
        "quantization": quantization,
        "prompts_sha256": prompts_digest(prompts),
        "num_prompts": len(prompts),
        "settings": asdict(settings),
    }


def set_key(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def to_uint8(images: Any) -> np.ndarray:
    """Float ``[0, 1]`` images as uint8, rounded as diffusers' ``numpy_to_pil`` does."""
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def read_png(path: str | os.PathLike) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), np.uint8)


@dataclass(frozen=True, kw_only=True)
class ImageSet:
    """A finished set of images on disk; read in batches (a COCO-size set is ~30 GB)."""

    folder: Path
    entries: tuple[dict[str, Any], ...]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def prompts(self) -> list[str]:
        return [e["prompt"] for e in self.entries]

    def load(self, start: int, stop: int) -> np.ndarray:
        return np.stack([read_png(self.folder / e["file"]) for e in self.entries[start:stop]])

    def batches(self, size: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, len(self), size):
            yield start, self.load(start, start + size)


def open_set(folder: str | os.PathLike) -> ImageSet:
    """A set written by `generate_set` (its ``index.json``)."""
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: no {INDEX}; not an image set written by mixdq")
    entries = json.loads(index.read_text(encoding="utf-8"))
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and {"file", "prompt", "seed"} <= set(e) for e in entries
    ):
        raise ValueError(f"{index}: expected a list of {{'file', 'prompt', 'seed'}} objects")
    return ImageSet(folder=folder, entries=tuple(entries))


def _check_description(folder: Path, description: dict[str, Any]) -> None:
    path = folder / DESCRIPTION
    if not path.is_file():
        if (folder / INDEX).is_file():
            raise ValueError(f"{folder}: {INDEX} without {DESCRIPTION}; use a new folder")
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    changed = _first_difference(old, description)
    if changed is not None:
        raise ValueError(
            f"{folder} holds images of another evaluation ({changed} differs: was "
            f"{_get(old, changed)!r}, now {_get(description, changed)!r}); use another --out "
            "folder or delete this one"
        )


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff is not None:
                return diff
        return None
    return None if a == b else prefix.rstrip(".")


def _get(d: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def complete_set(
    folder: str | os.PathLike, description: dict[str, Any], num: int
) -> ImageSet | None:
    """The finished set in ``folder`` if it is this description's with ``num`` images;
    ``None`` if it is absent or unfinished; a ValueError if it describes something else."""
    folder = Path(folder)
    if not (folder / DESCRIPTION).is_file():
        return None
    _check_description(folder, description)
    if not (folder / INDEX).is_file():
        return None
    images = open_set(folder)
    return images if len(images) == num else None


def initial_latents(pipe: Any, seed: int, height: int, width: int) -> np.ndarray:
    """The latents ``pipe(prompt, seed=seed)`` draws for one image (``[C, h, w]``)."""
    import jax  # noqa: PLC0415

    from mixdq_jax.pipeline import seed_keys  # noqa: PLC0415

    f = pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    return np.asarray(jax.random.normal(seed_keys(seed)[0], shape))[0]


def plan_images(prompts: Sequence[str], first_seed: int, *, digits: int = 5) -> list[dict]:
    """One ``{"file", "prompt", "seed"}`` record per image, in order: image ``i`` is
    ``{i:0<digits>d}.png`` from seed ``first_seed + i``."""
    return [{"file": f"{i:0{digits}d}.png", "prompt": p, "seed": first_seed + i}
            for i, p in enumerate(prompts)]  # fmt: skip


def write_images(
    folder: str | os.PathLike,
    records: Sequence[dict[str, Any]],
    render: Callable[[list[dict[str, Any]]], Any],
    *,
    write_index: Callable[[list[dict[str, Any]]], Any],
    done: Collection[str] = (),
    batch: int = 1,
    listed_first: bool = False,
    flush_seconds: float = 10.0,
    progress: str | None = None,
) -> list[dict[str, Any]]:
    """Write the images of ``records`` not in ``done`` (file names already finished), batch by
    batch; returns the index (the finished records, in order).

    ``render(chunk)`` gives the images of up to ``batch`` records (uint8 or float ``[0, 1]``,
    ``[n, H, W, 3]``); each PNG is written atomically. ``write_index(records)`` stores the index
    after each batch (beyond ``SMALL_INDEX`` records at most every ``flush_seconds``) and at the
    end. ``listed_first``: a batch's records are indexed before its images exist (and the
    index is written every batch), so a folder that must hold only indexed files (``mixdq
    generate``'s) never has an unlisted image (its caller counts a listed image that is missing
    as not done)
    ``progress``: a progress bar with this label while there is work.
    """
    folder = Path(folder)
    done = set(done)
    finished = {r["file"] for r in records if r["file"] in done}
    todo = [r for r in records if r["file"] not in finished]

    def index(*extra: dict[str, Any]) -> list[dict[str, Any]]:
        names = finished | {r["file"] for r in extra}
        return [r for r in records if r["file"] in names]

    bar = None
    if progress is not None and todo:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=progress,
                   unit="img")  # fmt: skip
    last, flushed = time.monotonic(), False  # nothing to do: the index is still written
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        if listed_first:
            write_index(index(*chunk))
        images = to_uint8(render(chunk))
        for record, image in zip(chunk, images, strict=True):
            atomic_write_bytes(folder / record["file"], _png(image))
            finished.add(record["file"])
        if bar is not None:
            bar.update(len(chunk))
        small = len(finished) <= SMALL_INDEX  # cheap to rewrite after every batch
        flushed = listed_first or small or time.monotonic() - last >= flush_seconds
        if flushed:
            write_index(index())
            last = time.monotonic()
    if bar is not None:
        bar.close()
    if not flushed:
        write_index(index())
    return index()


def generate_set(
    pipe: Any,
    prompts: Sequence[str],
    folder: str | os.PathLike,
    *,
    settings: GenerationSettings,
    description: dict[str, Any],
    qconfig: Any = None,
    flush_seconds: float = 10.0,
    progress: bool = True,
) -> ImageSet:
    """Generate (or finish) the set for ``prompts`` in ``folder``; returns it complete.

    PNGs are written atomically as each batch finishes; ``index.json`` is rewritten after each
    batch (beyond ``SMALL_INDEX`` entries at most every ``flush_seconds``, and at the end), so
    a kill costs at most that much work.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _check_description(folder, description)
    atomic_write_json(folder / DESCRIPTION, description)
    entries = list(open_set(folder).entries) if (folder / INDEX).is_file() else []
    if len(entries) > len(prompts) or any(
        e["prompt"] != p for e, p in zip(entries, prompts, strict=False)
    ):
        raise ValueError(f"{folder / INDEX}: its prompts are not these; use another folder")
    done = len(entries)
    if done < len(prompts):
        done -= done % settings.batch  # resume on a batch boundary: a batch shares step noise
    records = plan_images(prompts, settings.seed)

    def render(chunk: list[dict[str, Any]]) -> np.ndarray:
        texts, seeds = [r["prompt"] for r in chunk], [r["seed"] for r in chunk]
        pad = settings.batch - len(chunk)  # a short last batch repeats its last image: one shape
        latents = np.stack([initial_latents(pipe, s, settings.height, settings.width)
                            for s in seeds + [seeds[-1]] * pad])  # fmt: skip
        return pipe(texts + [texts[-1]] * pad, num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance_scale, height=settings.height,
                    width=settings.width, latents=latents, seed=seeds[0],
                    qconfig=qconfig)[: len(chunk)]  # fmt: skip

    entries = write_images(
        folder, records, render, write_index=lambda e: atomic_write_json(folder / INDEX, e),
        done=[r["file"] for r in records[:done]], batch=settings.batch,
        flush_seconds=flush_seconds, progress=f"images -> {folder}" if progress else None,
    )  # fmt: skip
    return ImageSet(folder=folder, entries=tuple(entries))


def cache_root() -> Path:
    """Where float image sets and FID reference statistics are cached between evaluations:
    ``$MIXDQ_CACHE`` or ``$XDG_CACHE_HOME/mixdq`` (``~/.cache/mixdq``)."""
    if os.environ.get("MIXDQ_CACHE"):
        return Path(os.environ["MIXDQ_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixdq"


__all__ = [
    "GenerationSettings",
    "ImageSet",
    "cache_root",
    "complete_set",
    "describe_set",
    "generate_set",
    "model_fingerprint",
    "open_set",
    "plan_images",
    "prompts_digest",
    "set_key",
    "to_uint8",
    "write_images",
]
