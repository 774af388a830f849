"""Fuse LoRA weights into PyTorch-named state dicts: ``W <- W + scale * (alpha/r) * up @ down``.

LCM-LoRA and most community LoRAs ship in one of two namings, both handled:

* diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (also the older
  ``<module>.lora.down.weight`` / ``lora.up.weight`` and ``processor.to_q_lora.down.weight``);
* kohya: ``lora_unet_<module_with_underscores>.lora_down.weight`` / ``lora_up.weight`` /
  ``.alpha``, and ``lora_te[12]_...`` for the text encoders.

Fusion happens on numpy state dicts before conversion to Flax, so the fused model is an ordinary
model: nothing downstream (quantization included) needs to know a LoRA was applied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
_DIFFUSERS_PREFIXES = {
    "unet.": "unet",
    "text_encoder.": "text_encoder",
    "text_encoder_2.": "text_encoder_2",
}
_PAIR_SUFFIXES = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)


class LoRAError(ValueError):
    """A LoRA file does not fit the model it is fused into."""


def _split_pairs(lora: Mapping[str, np.ndarray], source: str) -> dict[str, dict[str, np.ndarray]]:
    """Group LoRA tensors by their target key stem: {stem: {"down", "up", "alpha"}}."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in lora.items():
        for down_sfx, up_sfx in _PAIR_SUFFIXES:
            if key.endswith(down_sfx):
                groups.setdefault(key[: -len(down_sfx)], {})["down"] = value
                break
            if key.endswith(up_sfx):
                groups.setdefault(key[: -len(up_sfx)], {})["up"] = value
                break
        else:
            if key.endswith(".alpha"):
                groups.setdefault(key[: -len(".alpha")], {})["alpha"] = value
            else:
                raise LoRAError(f"{source}: unrecognised LoRA tensor {key!r}")
    for stem, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            lacking = "up" if "down" in parts else "down"
            raise LoRAError(f"{source}: LoRA {stem!r} lacks its {lacking} matrix")
    return groups


def _normalise_stem(stem: str) -> str:
    stem = stem.removeprefix("base_model.model.")
    # attn-processor naming: "...attn1.processor.to_q_lora" -> "...attn1.to_q"
    stem = re.sub(
        r"\.processor\.(to_[qkv]|to_out)_lora$",
        lambda m: "." + (m.group(1) + ".0" if m.group(1) == "to_out" else m.group(1)),
        stem,
    )
    return stem


def _delta(parts: dict[str, np.ndarray], stem: str, weight_shape: tuple[int, ...]) -> np.ndarray:
    down = np.asarray(parts["down"], dtype=np.float32)
    up = np.asarray(parts["up"], dtype=np.float32)
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise LoRAError(f"LoRA {stem!r}: up {up.shape} and down {down.shape} ranks differ")
    alpha = float(np.asarray(parts["alpha"])) if "alpha" in parts else float(rank)
    delta = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    if delta.size != int(np.prod(weight_shape)):
        raise LoRAError(
            f"LoRA {stem!r}: update of shape {delta.shape} does not fit weight {weight_shape}"
        )
    return (alpha / rank) * delta.reshape(weight_shape)


def fuse_lora(
    states: Mapping[str, dict[str, np.ndarray]],
    lora: Mapping[str, np.ndarray],
    *,
    scale: float = 1.0,
    source: str = "<lora>",
) -> dict[str, dict[str, np.ndarray]]:
    """Return copies of the component state dicts (``{"unet": {...}, ...}``) with LoRA fused.

    Every LoRA pair must land on a weight of a loaded component; a pair that matches nothing is
    an error naming it (a silently skipped LoRA would give a model that looks fine but is not).
    """
    out = {name: dict(state) for name, state in states.items()}
    # kohya names flatten dots to underscores: index each component's weights that way.
    flat_index = {
        name: {k[: -len(".weight")].replace(".", "_"): k for k in state if k.endswith(".weight")}
        for name, state in states.items()
    }
    unmatched = []
    for stem, parts in _split_pairs(lora, source).items():
        component, key = _target(stem, states, flat_index)
        if component is None:
            unmatched.append(stem)
            continue
        weight = out[component][key]
        delta = _delta(parts, stem, tuple(weight.shape))
        out[component][key] = (np.asarray(weight, np.float32) + scale * delta).astype(weight.dtype)
    if unmatched:
        raise LoRAError(
            f"{source}: {len(unmatched)} LoRA target(s) match no weight of "
            f"{', '.join(sorted(states))}: {', '.join(sorted(unmatched)[:8])}"
            + (" ..." if len(unmatched) > 8 else "")
        )
    return out


def _target(
    stem: str,
    states: Mapping[str, Mapping[str, np.ndarray]],
    flat_index: Mapping[str, Mapping[str, str]],
) -> tuple[str | None, str]:
    for prefix, component in _KOHYA_PREFIXES.items():
        if stem.startswith(prefix) and component in states:
            flat = stem[len(prefix) :]
            index = flat_index[component]
            for candidate in (flat, flat.removeprefix("text_model_")):
                if candidate in index:
                    return component, index[candidate]
            return None, ""
    stem = _normalise_stem(stem)
    component = "unet"
    for prefix, comp in _DIFFUSERS_PREFIXES.items():
        if stem.startswith(prefix):
            component, stem = comp, stem[len(prefix) :]
            break
    if component not in states:
        return None, ""
    for candidate in (stem, stem.removeprefix("text_model.")):
        if f"{candidate}.weight" in states[component]:
            return component, f"{candidate}.weight"
    return None, ""


# ------------------------------------------------------------------------------ runtime LoRA
# Used by `mixdq_jax.deploy.lora`, which keeps a LoRA as a separate low-rank branch of a
# quantized layer instead of fusing it into the weights.
def match_lora(
    targets: Mapping[str, Mapping[str, object]],
    lora: Mapping[str, np.ndarray],
    *,
    source: str = "<lora>",
) -> dict[str, tuple[str, str, dict[str, np.ndarray]]]:
    """``{stem: (component, weight key, {"down", "up"[, "alpha"]})}``: every LoRA pair of
    ``lora`` matched to a weight key of ``targets`` (``{component: {PyTorch key: anything}}``,
    only the keys are read), with the same naming rules as :func:`fuse_lora`. A pair that
    matches nothing is a :class:`LoRAError` naming it, as in :func:`fuse_lora`."""
    flat_index = {
        name: {k[: -len(".weight")].replace(".", "_"): k for k in keys if k.endswith(".weight")}
        for name, keys in targets.items()
    }
    out, unmatched = {}, []
    for stem, parts in _split_pairs(lora, source).items():
        component, key = _target(stem, targets, flat_index)
        if component is None:
            unmatched.append(stem)
        else:
            out[stem] = (component, key, parts)
    if unmatched:
        raise LoRAError(
            f"{source}: {len(unmatched)} LoRA target(s) match no weight of "
            f"{', '.join(sorted(targets))}: {', '.join(sorted(unmatched)[:8])}"
            + (" ..." if len(unmatched) > 8 else "")
        )
    return out


def lora_factors(
    parts: Mapping[str, np.ndarray], stem: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """``(down (r, ...), up (out, r), alpha / r)`` of one LoRA pair in f32, PyTorch layouts
    (``down``: ``(r, in)`` or ``(r, in, kh, kw)``), so that the fused update is
    ``(alpha / r) * up @ down.reshape(r, -1)`` as :func:`fuse_lora` adds it."""
    down = np.asarray(parts["down"], dtype=np.float32)
    up = np.asarray(parts["up"], dtype=np.float32)
    rank = down.shape[0]
    if up.ndim < 2 or up.shape[1] != rank or int(np.prod(up.shape[2:], dtype=np.int64)) != 1:
        raise LoRAError(f"LoRA {stem!r}: up {up.shape} and down {down.shape} ranks differ")
    alpha = float(np.asarray(parts["alpha"])) if "alpha" in parts else float(rank)
    return down, up.reshape(up.shape[0], rank), alpha / rank


def lora_delta(
    parts: Mapping[str, np.ndarray], stem: str, weight_shape: tuple[int, ...]
) -> np.ndarray:
    """The fused update ``(alpha / r) up @ down`` of one pair in the PyTorch weight's shape
    (:func:`fuse_lora` adds ``scale`` times it)."""
    return _delta(dict(parts), stem, tuple(weight_shape))
