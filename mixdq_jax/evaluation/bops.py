"""The paper's efficiency columns: "Compute Opt." (bit operations, BOPs) and "Storage Opt.".

BOPs of one UNet forward are counted per quantizable layer (every Dense and Conv) as
``MACs x op_bits``. MACs come from the shapes one abstract forward records (output elements x
kernel elements per output channel), so strides, padding and the text length are those of the
real model; nothing is materialised. ``op_bits`` follows Table 1: a layer whose activations
are quantized multiplies ``w_bits x a_bits``; a layer whose activations stay float runs in
FP16 whatever its weights (the weights are dequantized first), ``16 x 16``: this is why the
paper's weight-only rows (W4A16, W3.66A16) read "1x". Attention score products, norms and
nonlinearities are not counted (they stay float in every row, as in the paper).

SVDQuant's low-rank branch (the group format, `mixdq_jax.quant.lowrank`) adds, per layer that
carries one (weights of at most ``LOWRANK_BITS`` bits), ``r * (K + N)`` MACs per output
token (``x down``: ``K = kh * kw * cin`` per rank, then ``@ up``: ``N`` per rank) at 16 x 16
bits: the branch is 16-bit. The per-group scale multiplications of the group format (one
per group of ``group`` MACs) and the smoothing division are epilogue work and not counted,
as the per-channel scales are not.

Storage is the bytes of the UNet as ``mixdq export`` stores it (packed weights, scales, zero
points, BOS rows, other params in FP16), from `mixdq_jax.deploy.memory`, so the ratio is the
one ``mixdq bench memory`` prints.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.deploy.memory import stored_param_bytes, tree_nbytes
from mixdq_jax.deploy.packed import DeployPlan, packed_shapes
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, param_shapes
from mixdq_jax.quant.intercept import LayerCall, Mode, Records
from mixdq_jax.quant.layer_formats import op_bits
from mixdq_jax.quant.lowrank import LOWRANK_BITS
from mixdq_jax.quant.qconfig import FLOAT_BITS, QuantSpec
from mixdq_jax.quant.registry import layer_splits, traced_records, unet_layers

Bits = int | Mapping[str, int]


@dataclass(frozen=True, kw_only=True)
class _CountMacs(Mode):
    """Records each layer's ``(MACs, output tokens, K, N)`` for one sample (shapes only)."""

    def handle(self, call: LayerCall, qconfig: Any, records: Records) -> jax.Array:
        out = call.original()
        kernel = call.params["kernel"]
        per_output = int(np.prod(kernel.shape[:-1]))  # kh*kw*in/groups, or in for a Dense
        macs = int(np.prod(out.shape[1:])) * per_output
        tokens = int(np.prod(out.shape[1:-1]))
        value = (macs, tokens, per_output, int(kernel.shape[-1]))
        records.add(call.name, value, lambda old, new: (old[0] + new[0], old[1] + new[1],
                                                        *old[2:]))  # fmt: skip
        return out


Latent = int | tuple[int, int] | None


def _hw(config: UNetConfig, latent: Latent) -> tuple[int, int]:
    if latent is None:
        size = config.sample_size or 64
        return tuple(size) if isinstance(size, tuple) else (size, size)
    return (latent, latent) if isinstance(latent, int) else (int(latent[0]), int(latent[1]))


def _macs(config: UNetConfig, hw: tuple[int, int], seq_len: int) -> dict[str, int]:
    return {name: c[0] for name, c in _counts(config, hw, seq_len).items()}


@functools.cache
def _counts(
    config: UNetConfig, hw: tuple[int, int], seq_len: int
) -> dict[str, tuple[int, int, int, int]]:
    return traced_records(config, _CountMacs(), batch=1, hw=hw, seq_len=seq_len)


def layer_macs(config: UNetConfig, *, latent: Latent = None, seq_len: int = 77) -> dict[str, int]:
    """``{layer: MACs of one forward for one sample}`` at a latent of ``latent`` (side, or
    (height, width); ``None``: the config's sample size). SDXL at 512x512 images: 64."""
    return dict(_macs(config, _hw(config, latent), seq_len))


def layer_branch_macs(
    config: UNetConfig, ranks: int | Mapping[str, int], *, latent: Latent = None,
    seq_len: int = 77,
) -> dict[str, int]:  # fmt: skip
    """``{layer: MACs of its rank-r low-rank branch}`` for one sample: ``tokens * r * (K + N)``
    (``ranks``: one rank for every layer, capped at ``min(K, N)`` as the decomposition caps
    it, or ``{layer: rank}``; layers a mapping leaves out have no branch)."""
    counts = _counts(config, _hw(config, latent), seq_len)
    out = {}
    for name, (_, tokens, k, n) in counts.items():
        r = min(int(ranks), k, n) if not isinstance(ranks, Mapping) else int(ranks.get(name, 0))
        if r:
            out[name] = tokens * r * (k + n)
    return out


def _per_layer(bits: Bits, names: list[str], what: str) -> dict[str, int]:
    if isinstance(bits, Mapping):
        unknown = sorted(set(bits) - set(names))
        if unknown:
            raise ValueError(f"{what}: unknown layer(s) {unknown[:5]} (not in this UNet)")
        return {n: int(bits.get(n, FLOAT_BITS)) for n in names}
    return dict.fromkeys(names, int(bits))


def compute_cost(
    config: UNetConfig,
    weight_bits: Bits,
    act_bits: Bits,
    *,
    latent: Latent = None,
    ranks: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """BOPs of one UNet forward at ``weight_bits`` / ``act_bits`` (one number or per layer;
    layers a mapping leaves out are float) and the saving vs FP16 ("Compute Opt.").

    ``ranks``: ``{layer: rank}`` of the low-rank branches the model runs (SVDQuant's format:
    :func:`spec_ranks` / :func:`plan_ranks`); each adds ``r (K + N)`` MACs per token at
    16 x 16 bits. ``macs`` counts the layers, ``branch_macs`` the branches."""
    macs = layer_macs(config, latent=latent)
    names = list(macs)
    w = _per_layer(weight_bits, names, "weight_bits")
    a = _per_layer(act_bits, names, "act_bits")
    if ranks:
        unknown = sorted(set(ranks) - set(names))
        if unknown:
            raise ValueError(f"ranks: unknown layer(s) {unknown[:5]} (not in this UNet)")
    branch = layer_branch_macs(config, dict(ranks or {}), latent=latent)
    branch_macs = sum(branch.values())
    bops = sum(macs[n] * op_bits(w[n], a[n]) for n in names)
    bops += branch_macs * FLOAT_BITS * FLOAT_BITS
    float_bops = sum(macs[n] * FLOAT_BITS * FLOAT_BITS for n in names)
    total_macs = sum(macs.values())
    return {
        "latent": list(_hw(config, latent)),
        "layers": len(names),
        "macs": int(total_macs),
        "branch_macs": int(branch_macs),
        "bops": int(bops),
        "float_bops": int(float_bops),
        "compute_opt": float_bops / bops,
        "mean_op_bits": bops / (total_macs + branch_macs),
        "rule": "per Dense/Conv: MACs x w_bits x a_bits; activations at 16 bits: 16 x 16; "
        "a low-rank branch: r (K + N) MACs per token at 16 x 16",
    }


def spec_bits(config: UNetConfig, spec: QuantSpec | None) -> tuple[dict, dict]:
    """Per-layer ``(weight_bits, act_bits)`` of a spec on a UNet (16 = float)."""
    splits = layer_splits(unet_layers(config))
    if spec is None:
        return dict.fromkeys(splits, FLOAT_BITS), dict.fromkeys(splits, FLOAT_BITS)
    ranges = {  # placeholders: ranges change values, never bits
        n: np.array([[-1.0, 1.0]] * (2 if s is not None else 1), np.float32)
        for n, s in splits.items()
    }
    return spec.to_qconfig(splits, ranges).bits()


def spec_ranks(config: UNetConfig, spec: QuantSpec | None) -> dict[str, int]:
    """``{layer: rank}`` of the low-rank branches a spec runs: its ``lowrank`` layers whose
    weights have at most ``LOWRANK_BITS`` bits (the fake quantizer's rule)."""
    if spec is None or not spec.lowrank:
        return {}
    w, _ = spec_bits(config, spec)
    return {n: lr.rank for n, lr in spec.lowrank.items() if w[n] <= LOWRANK_BITS and lr.rank}


def plan_ranks(plan: DeployPlan) -> dict[str, int]:
    """``{layer: rank}`` of the branches an exported plan stores."""
    return {n: lp.rank for n, lp in plan.layers.items() if lp.rank}


def plan_bits(config: UNetConfig, plan: DeployPlan) -> tuple[dict, dict]:
    """Per-layer bits of an exported model's plan (layers outside it are float)."""
    names = [layer.name for layer in unet_layers(config)]
    w = {n: plan.layers[n].w_bits if n in plan.layers else FLOAT_BITS for n in names}
    a = {n: plan.layers[n].a_bits if n in plan.layers else FLOAT_BITS for n in names}
    return w, a


def storage_cost(
    config: UNetConfig,
    spec: QuantSpec | None = None,
    *,
    plan: DeployPlan | None = None,
    bos_dim: int | None = None,
) -> dict[str, Any]:
    """Stored UNet bytes (FP16 for non-quantized params) for a spec or an exported plan, and
    the saving vs the FP16 UNet ("Storage Opt."), as ``mixdq bench memory`` counts them."""
    fp16 = stored_param_bytes(config, None)
    if plan is not None:
        model = UNet2DConditionModel(config=config, dtype=jnp.float16, param_dtype=jnp.float16)
        ranges = {n: np.zeros((len(lp.parts()), 2), np.float32) for n, lp in plan.layers.items()}
        stored = tree_nbytes(
            packed_shapes(param_shapes(model), plan, ranges, float_dtype=jnp.float16,
                          bos_dim=bos_dim)
        )  # fmt: skip
    elif spec is not None and spec.fp8:
        return {"fp16_bytes": fp16, "param_bytes": None, "storage_opt": None,
                "note": "FP8 fake quant has no packed export to measure"}  # fmt: skip
    else:
        stored = stored_param_bytes(config, spec)
    return {"fp16_bytes": int(fp16), "param_bytes": int(stored), "storage_opt": fp16 / stored}


def efficiency(
    config: UNetConfig,
    *,
    spec: QuantSpec | None = None,
    plan: DeployPlan | None = None,
    bos_dim: int | None = None,
    latent: Latent = None,
) -> dict[str, Any]:
    """Both columns for a float model, a fake-quant spec or an exported plan (with their
    low-rank branches)."""
    w, a = plan_bits(config, plan) if plan is not None else spec_bits(config, spec)
    ranks = plan_ranks(plan) if plan is not None else spec_ranks(config, spec)
    return {
        "compute": compute_cost(config, w, a, latent=latent, ranks=ranks),
        "storage": storage_cost(config, spec, plan=plan, bos_dim=bos_dim),
    }


__all__ = [
    "compute_cost",
    "efficiency",
    "layer_branch_macs",
    "layer_macs",
    "op_bits",
    "plan_bits",
    "plan_ranks",
    "spec_bits",
    "spec_ranks",
    "storage_cost",
]
