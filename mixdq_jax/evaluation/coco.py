"""Evaluation prompts: a text file (one prompt a line) or COCO's captions annotation file.

The paper scores SDXL-turbo on COCO val2014 captions, one caption per image: "all 40,504"
(Table 1) and "the first 1024" (Tables 2, 3). ``load_prompts`` gives both:
``select="first"`` keeps images in the order the annotation file first mentions them, each
with its first caption (no randomness); ``select="random"`` draws ``num`` images and one of
each image's captions with ``seed``. A text file is read in order (``num`` first lines, or a
seeded sample with ``select="random"``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixdq_jax.io_utils import read_json, read_text

SELECTIONS = ("first", "random")


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One evaluation prompt; ``image_id`` is the COCO image it describes (None for text)."""

    text: str
    image_id: int | None = None


@dataclass(frozen=True, kw_only=True)
class PromptSet:
    """The prompts of an evaluation and how they were chosen (recorded in metrics.json)."""

    prompts: tuple[Prompt, ...]
    source: str
    kind: str  # "coco" or "text"
    select: str
    seed: int
    available: int  # images (COCO) or lines (text) in the file

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    def settings(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "select": self.select,
            "seed": self.seed,
            "num": len(self.prompts),
            "available": self.available,
        }

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(p) for p in self.prompts]


def _clean(text: str) -> str:
    """COCO captions carry stray newlines and double spaces: one space between words."""
    return " ".join(text.split())


def read_coco_captions(path: str | os.PathLike) -> dict[int, list[str]]:
    """``{image_id: [captions]}`` of a COCO captions file, images in first-mention order."""
    path = Path(path)
    data = read_json(path, what="a COCO captions file (captions_val2014.json)")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(
            f"{path}: a COCO captions file has a top-level 'annotations' list "
            "(as captions_val2014.json); this file has none"
        )
    out: dict[int, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise ValueError(
                f"{path}: annotations[{i}] = {str(ann)[:80]!r} lacks 'image_id' or 'caption'"
            )
        caption = ann["caption"]
        if not isinstance(caption, str) or not _clean(caption):
            raise ValueError(f"{path}: annotations[{i}] has an empty or non-text caption")
        image_id = ann["image_id"]
        if (
            isinstance(image_id, bool)
            or not isinstance(image_id, int | str)
            or not str(image_id).strip().isdigit()
        ):
            raise ValueError(f"{path}: annotations[{i}] has image_id {image_id!r}, not a number")
        out.setdefault(int(image_id), []).append(_clean(caption))
    if not out:
        raise ValueError(f"{path}: the 'annotations' list is empty")
    return out


def read_text_prompts(path: str | os.PathLike) -> list[str]:
    """Non-empty lines of a UTF-8 text file, whitespace-normalised."""
    path = Path(path)
    lines = [_clean(line) for line in read_text(path).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"{path}: no prompts (one prompt per non-empty line)")
    return lines


def _count(num: int | None, available: int, path: Path, what: str) -> int:
    if num is None:
        return available
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if num > available:
        raise ValueError(
            f"{path}: asked for {num} prompts but the file has {available} {what}; "
            "ask for fewer (or all)"
        )
    return num


def load_prompts(
    path: str | os.PathLike,
    *,
    num: int | None = None,
    select: str = "first",
    seed: int = 0,
) -> PromptSet:
    """``num`` prompts (``None``: all) from a COCO captions ``.json`` or a text file."""
    path = Path(path)
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    rng = np.random.default_rng(seed)
    if path.suffix.lower() == ".json":
        captions = read_coco_captions(path)
        ids = list(captions)
        n = _count(num, len(ids), path, "images")
        if select == "first":
            chosen = [Prompt(text=captions[i][0], image_id=i) for i in ids[:n]]
        else:
            picked = sorted(rng.choice(len(ids), size=n, replace=False).tolist())
            chosen = []
            for k in picked:
                options = captions[ids[k]]
                chosen.append(Prompt(text=options[rng.integers(len(options))], image_id=ids[k]))
        kind, available = "coco", len(ids)
    else:
        lines = read_text_prompts(path)
        n = _count(num, len(lines), path, "prompts")
        if select == "first":
            rows: Sequence[int] = range(n)
        else:
            rows = sorted(rng.choice(len(lines), size=n, replace=False).tolist())
        chosen = [Prompt(text=lines[k]) for k in rows]
        kind, available = "text", len(lines)
    return PromptSet(
        prompts=tuple(chosen),
        source=str(path),
        kind=kind,
        select=select,
        seed=seed,
        available=available,
    )


__all__ = ["SELECTIONS", "Prompt", "PromptSet", "load_prompts", "read_coco_captions"]
