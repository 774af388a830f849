"""Make transformers CLIP text-encoder state dicts of every version look like our module names.

transformers < 5 saved ``CLIPTextModel`` keys as ``text_model.encoder...`` (the real SD1.5 and
SDXL-turbo files), transformers 5 saves them bare, and ``CLIPTextModelWithProjection`` keeps the
prefix in both. Our Flax models use the bare names, so strip the prefix everywhere; the
``position_ids`` buffer (persisted by some old versions) is an arange, not a weight, so drop it.
"""

from __future__ import annotations

from collections.abc import Mapping

_PREFIX = "text_model."


def normalize_clip_keys(state: Mapping[str, object]) -> dict:
    """Return a new dict with ``text_model.`` stripped and ``position_ids`` buffers dropped."""
    out: dict = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        new = key.removeprefix(_PREFIX)
        if new in out:
            raise ValueError(f"CLIP state dict holds {new!r} both with and without {_PREFIX!r}")
        out[new] = value
    return out
