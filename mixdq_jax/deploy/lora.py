"""LoRA on a quantized model at run time: a low-rank branch beside the frozen integer weights.

Fusing a LoRA into a quantized model would mean requantizing it (new codes, new scales, a
new export). Instead every LoRA'd layer of a loaded export gets the LoRA as (more columns
of) a 16-bit low-rank branch, the branch SVDQuant's format already runs
(`mixdq_jax.deploy.layers`: ``y += ((x / smooth) down * branch_scale) up``):

    down <- [down, smooth * (A^T)]      up <- [up; (alpha / r) B^T]
    branch_scale <- [1 ... 1, s ... s]  lora_slot <- [0 ... 0, i ... i]

for LoRA ``i`` (1-based) with ``W' = W + s (alpha / r) B A`` (PyTorch layouts; a conv's ``A``
in the kernel's HWIO layout, run with the layer's geometry). The branch input is ``x / smooth``
where the layer stores a smoothing vector (SVDQuant), so the LoRA's down factor is multiplied
row-wise by ``smooth``: ``(x / smooth) (smooth A^T) = x A^T``; a layer without a branch (any
export: W8A8, W4A8, mixed) gets one, and a float layer of the export gets one too (planned
as ``float``: its own op plus the branch). The quantized weights are untouched: the layer's
output is exactly the quantized layer's plus ``x dW`` with ``dW`` the LoRA's update, to
float rounding. A BOS-aware layer's stored BOS row gets the LoRA's columns added at run time.

The scale is data: ``branch_scale`` is a traced leaf, so :func:`set_lora_scales` changes
the scales of any number of LoRAs without reloading or recompiling (only that leaf is
replaced; shapes and the layer mode stay). Several LoRAs at once: a list of ``(file,
scale)``. Text-encoder parts of a LoRA (the text encoders of an export are float) are fused
into the text encoders' weights at the given scale (float fusion is exact); their scale is
fixed by :func:`apply_lora` (apply again to the loaded model to change it).

Nothing here writes an export: a LoRA'd model lives in memory (export from a float model
with ``mixdq export --lora`` to fuse one into the quantized weights instead).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mixdq_jax.deploy.layers import Deployed
from mixdq_jax.deploy.packed import DeployPlan, LayerPlan, _replace_node, node_at, path_of
from pallas_kernels.grid import FLOAT_BITS
from weights_convert.convert import flax_to_torch, torch_to_flax
from weights_convert.lora import LoRAError, lora_delta, lora_factors, match_lora
from weights_convert.safetensors_io import load_safetensors

LoRASource = str | os.PathLike | Mapping[str, Any]
LoRAs = LoRASource | Sequence[LoRASource | tuple[LoRASource, float]]
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")


def _normalise(loras: LoRAs, scales: Sequence[float] | float | None) -> list[tuple[Any, float]]:
    """``[(source, scale)]`` from one source, a list of sources or of ``(source, scale)``."""
    if isinstance(loras, str | os.PathLike | Mapping):
        loras = [loras]
    items = []
    for item in loras:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(f"a LoRA is a file or (file, scale), got {item!r}")
            items.append((item[0], float(item[1])))
        else:
            items.append((item, None))
    if scales is not None:
        scales = [float(scales)] * len(items) if np.ndim(scales) == 0 else list(scales)
        if len(scales) not in (1, len(items)):
            raise ValueError(
                f"{len(scales)} LoRA scales for {len(items)} LoRA(s): give one scale for all "
                "or one per LoRA"
            )
        scales = scales * len(items) if len(scales) == 1 else scales
        items = [(src, s if s is not None else float(scales[i]))
                 for i, (src, s) in enumerate(items)]  # fmt: skip
    out = [(src, 1.0 if s is None else s) for src, s in items]
    for src, s in out:
        if not np.isfinite(s):
            raise ValueError(f"LoRA {_name(src)}: scale {s} is not finite")
    if not out:
        raise ValueError("no LoRA given")
    return out


def _name(source: Any) -> str:
    return "<mapping>" if isinstance(source, Mapping) else str(source)


def _read(source: Any) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        return {k: np.asarray(v) for k, v in source.items()}
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path}: no such file")
    return load_safetensors(path)


def _layer_nodes(plan: DeployPlan, params: Mapping) -> dict[str, tuple[int, ...]]:
    """``{layer name: kernel shape}`` of every planned layer and every float Dense/Conv node
    (a node holding a ``kernel``) of the packed tree: what a LoRA may target."""
    out = {name: tuple(lp.weight_shape) for name, lp in plan.layers.items()}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] == "kernel":
            out.setdefault(".".join(path[:-1]), tuple(leaf.shape))
    return out


def lora_count(params: Mapping) -> int:
    """How many LoRAs the packed tree carries (the largest ``lora_slot``; 0: none)."""
    slots = [
        int(np.max(np.asarray(leaf))) if np.size(leaf) else 0
        for path, leaf in traverse_util.flatten_dict(params).items()
        if path[-1] == "lora_slot"
    ]
    return max(slots, default=0)


def _flax_factors(
    parts: Mapping[str, np.ndarray], stem: str, name: str, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """``(down, up)`` of one pair in the Flax layout: ``down`` the kernel's shape with ``out``
    replaced by the rank (``A^T``; HWIO for a conv), ``up`` ``(r, out)`` with ``alpha / r``."""
    down, up, factor = lora_factors(parts, stem)
    r = down.shape[0]
    cin, n = shape[-2], shape[-1]
    positions = int(np.prod(shape[:-2], dtype=np.int64))
    if down.size != r * cin * positions or up.shape[0] != n:
        raise LoRAError(
            f"LoRA {stem!r}: down {down.shape} / up {up.shape} do not fit layer {name!r} "
            f"(kernel {shape}: {cin} inputs, {n} outputs"
            + (f", a {shape[0]}x{shape[1]} conv" if len(shape) == 4 else "")
            + "); is this LoRA for another model?"
        )
    if len(shape) == 2:
        down_f = down.reshape(r, cin).T
    else:  # PyTorch (r, in, kh, kw) -> HWIO (kh, kw, in, r)
        down_f = down.reshape(r, cin, shape[0], shape[1]).transpose(2, 3, 1, 0)
    return np.ascontiguousarray(down_f), np.ascontiguousarray(up.T * factor)


def _with_branch(
    node: Mapping, down: np.ndarray, up: np.ndarray, scale: float, slot: int, dtype: Any
) -> dict:
    """``node`` with a LoRA's columns appended to its branch (the branch created if none)."""
    node = dict(node)
    down = jnp.asarray(down, jnp.float32)
    if "smooth" in node:  # the branch input is x / smooth: (x / s)(s A^T) = x A^T
        down = down * jnp.asarray(node["smooth"], jnp.float32)[:, None]
    down, up = down.astype(dtype), jnp.asarray(up, dtype)
    r = up.shape[0]
    if "up" in node:
        r0 = node["up"].shape[0]
        old_scale = node.get("branch_scale", jnp.ones((r0,), jnp.float32))
        old_slot = node.get("lora_slot", jnp.zeros((r0,), jnp.int32))
        down = jnp.concatenate([jnp.asarray(node["down"]).astype(dtype), down], axis=-1)
        up = jnp.concatenate([jnp.asarray(node["up"]).astype(dtype), up], axis=0)
    else:
        old_scale, old_slot = jnp.zeros((0,), jnp.float32), jnp.zeros((0,), jnp.int32)
    node["down"], node["up"] = down, up
    node["branch_scale"] = jnp.concatenate([old_scale, jnp.full((r,), scale, jnp.float32)])
    node["lora_slot"] = jnp.concatenate([old_slot, jnp.full((r,), slot, jnp.int32)])
    return node


def lora_params(
    plan: DeployPlan,
    params: Mapping,
    loras: LoRAs,
    scales: Sequence[float] | float | None = None,
    *,
    dtype: Any = jnp.float32,
    text_params: Mapping[str, Any] | None = None,
) -> tuple[DeployPlan, dict, dict[str, Any]]:
    """``(plan, packed params, text-encoder params)`` with ``loras`` as runtime branches.

    ``plan`` / ``params``: a loaded export's (`load_quantized_unet`; they may already carry
    LoRAs: the new ones are numbered after them). ``loras``: a file (or ``{name: tensor}``),
    a list of them, or of ``(file, scale)``; ``scales``: one for all or one per LoRA
    (default 1). ``dtype``: of the LoRA factors. ``text_params``: ``{component: params}`` of
    the float text encoders; LoRA pairs for them are fused into these at their scale (a
    LoRA with text-encoder pairs and no ``text_params`` is an error naming them). Every pair
    must match a layer (a `LoRAError` names the file and the pairs that match nothing)."""
    items = _normalise(loras, scales)
    layers = _layer_nodes(plan, params)
    targets: dict[str, Mapping[str, Any]] = {"unet": {f"{n}.weight": None for n in layers}}
    text_params = dict(text_params or {})
    text_states: dict[str, dict[str, np.ndarray]] = {}
    out, new_layers = dict(params), dict(plan.layers)
    first = lora_count(params) + 1
    for i, (source, scale) in enumerate(items):
        lora, where = _read(source), _name(source)
        text_keys = _text_keys(lora)
        if text_keys - set(text_params):
            raise LoRAError(
                f"{where}: has pairs for {', '.join(sorted(text_keys - set(text_params)))}, "
                "which this model does not hold: apply it to the whole QuantizedPipeline (its "
                "text encoders), not to the UNet alone"
            )
        for comp in text_keys:
            if comp not in text_states:
                text_states[comp] = flax_to_torch(text_params[comp])
        matched = match_lora({**targets, **text_states}, lora, source=where)
        for stem, (component, key, parts) in matched.items():
            if component != "unet":
                state = text_states[component]
                delta = lora_delta(parts, f"{where}: {stem}", state[key].shape)
                state[key] = (state[key].astype(np.float32) + scale * delta).astype(
                    state[key].dtype
                )
                continue
            name = key[: -len(".weight")]
            down, up = _flax_factors(parts, f"{where}: {stem}", name, layers[name])
            node = node_at(out, name)
            out = _replace_node(
                out, path_of(out, name), _with_branch(node, down, up, scale, first + i, dtype)
            )
            if name not in new_layers:  # a float layer of the export: planned to run its branch
                shape = layers[name]
                new_layers[name] = LayerPlan(
                    name=name, kind="linear" if len(shape) == 2 else "conv", weight_shape=shape,
                    w_bits=FLOAT_BITS, a_bits=FLOAT_BITS, storage_bits=FLOAT_BITS,
                    symmetric=False,
                )  # fmt: skip
    new_text = {
        comp: torch_to_flax(state, text_params[comp], what=f"{comp} (LoRA fused)")
        for comp, state in text_states.items()
    }
    new_plan = plan if new_layers == dict(plan.layers) else DeployPlan(layers=new_layers)
    return new_plan, out, new_text


def _text_keys(lora: Mapping[str, Any]) -> set[str]:
    """The text-encoder components a LoRA's tensor names point at."""
    found = set()
    for key in lora:
        if key.startswith(("lora_te_", "lora_te1_", "text_encoder.")):
            found.add("text_encoder")
        elif key.startswith(("lora_te2_", "text_encoder_2.")):
            found.add("text_encoder_2")
    return found


def apply_lora(
    model: Any,
    loras: LoRAs,
    scales: Sequence[float] | float | None = None,
    *,
    dtype: Any = jnp.float32,
) -> Any:
    """``model`` (a loaded export: `QuantizedPipeline` or its `QuantizedUNet` in the
    ``Deployed`` mode) with ``loras`` as runtime low-rank branches; the same type back.

    ``loras`` / ``scales``: as :func:`lora_params`. Change the scales later with
    :func:`set_lora_scales` (no reload, no recompile). A float pipeline fuses a LoRA when it
    loads instead (``load_pipeline(..., lora=FILE, lora_scale=S)``)."""
    from mixdq_jax.pipeline import QuantizedPipeline  # noqa: PLC0415 (import cycle)

    pipe = model if isinstance(model, QuantizedPipeline) else None
    unet = model.quantized if pipe is not None else model
    mode = getattr(unet, "mode", None)
    if not isinstance(mode, Deployed):
        raise ValueError(
            f"apply_lora takes a quantized model loaded from a mixdq export (a QuantizedPipeline "
            f"or its Deployed QuantizedUNet), got {type(model).__name__}; a float model fuses a "
            "LoRA when it loads: load_pipeline(..., lora=FILE, lora_scale=S)"
        )
    text = {}
    if pipe is not None:
        text = {c: pipe.pipeline.params[c] for c in TEXT_COMPONENTS if c in pipe.pipeline.params}
    plan, params, new_text = lora_params(
        mode.plan, unet.params, loras, scales, dtype=dtype, text_params=text
    )
    new_mode = mode if plan is mode.plan else replace(mode, plan=plan)
    unet = unet.replace(params=params, mode=new_mode)
    if pipe is None:
        return unet
    if new_text:
        pipe = pipe.with_params(**new_text)
    return pipe.with_quantized(unet)


def set_lora_scales(model: Any, scales: Sequence[float] | float) -> Any:
    """``model`` (from :func:`apply_lora`, or its packed params tree) with the scales of its
    LoRAs replaced (one for all, or one per LoRA in the order applied): only the traced
    ``branch_scale`` leaves change, so a compiled sampling loop is reused as it is. The
    exported SVD branch keeps scale 1; text-encoder parts keep the scale they were fused at."""
    from mixdq_jax.pipeline import QuantizedPipeline  # noqa: PLC0415 (import cycle)

    if isinstance(model, QuantizedPipeline):
        return model.with_quantized(set_lora_scales(model.quantized, scales))
    if hasattr(model, "params") and hasattr(model, "replace"):
        return model.replace(params=set_lora_scales(model.params, scales))
    params = model
    count = lora_count(params)
    if count == 0:
        raise ValueError("set_lora_scales: this model carries no LoRA (apply_lora first)")
    values = [float(scales)] * count if np.ndim(scales) == 0 else [float(s) for s in scales]
    if len(values) != count:
        raise ValueError(
            f"set_lora_scales: {len(values)} scale(s) for the {count} LoRA(s) this model "
            "carries: give one for all or one per LoRA, in the order they were applied"
        )
    if not all(np.isfinite(values)):
        raise ValueError(f"set_lora_scales: scales {values} must be finite")
    table = jnp.asarray([1.0, *values], jnp.float32)

    def update(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        node = {k: update(v) for k, v in node.items()}
        if "lora_slot" in node:
            node["branch_scale"] = table[node["lora_slot"]]
        return node

    return update(params)


def fuse_into_pipeline(pipe: Any, loras: LoRAs, scales: Sequence[float] | float | None = None):
    """A float `Pipeline` with ``loras`` fused into its weights, one after the other
    (``W += s (alpha / r) B A``, `weights_convert.lora.fuse_lora`): what ``load_pipeline(...,
    lora=...)`` does for one LoRA, for LoRAs given after loading (``mixdq generate``'s second
    and later ``--lora`` on a float model). Only the components a LoRA touches are rebuilt."""
    from weights_convert.lora import fuse_lora  # noqa: PLC0415

    if "unet" not in pipe.params:
        raise ValueError(
            f"{pipe.source}: fuse_into_pipeline takes a float pipeline; a quantized one runs "
            "LoRAs as branches: apply_lora"
        )
    names = [c for c in ("unet", *TEXT_COMPONENTS) if c in pipe.params]
    states: dict[str, dict[str, np.ndarray]] = {}
    for source, scale in _normalise(loras, scales):
        lora, where = _read(source), _name(source)
        keys = {c: (states[c] if c in states else _torch_keys(pipe.params[c])) for c in names}
        touched = {comp for comp, _, _ in match_lora(keys, lora, source=where).values()}
        for comp in touched - set(states):
            states[comp] = flax_to_torch(pipe.params[comp])
        fused = fuse_lora({c: states[c] for c in touched}, lora, scale=scale, source=where)
        states.update(fused)
    updates = {
        comp: torch_to_flax(state, pipe.params[comp], what=f"{comp} (LoRA fused)")
        for comp, state in states.items()
    }
    return pipe.with_params(**updates)


def _torch_keys(params: Mapping) -> dict[str, None]:
    """The PyTorch keys of a Flax params tree (names only: no array is converted)."""
    keys = {}
    for path in traverse_util.flatten_dict(params):
        leaf = path[-1]
        prefix = ".".join(path[:-1])
        name = "weight" if leaf in ("kernel", "scale", "embedding") else leaf
        keys[f"{prefix}.{name}" if prefix else name] = None
    return keys


__all__ = ["apply_lora", "fuse_into_pipeline", "lora_count", "lora_params", "set_lora_scales"]
