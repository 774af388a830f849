"""Measured UNet memory: bytes of the stored params, and the compiled peak of one forward.

Nothing is materialised: the float params are ``jax.ShapeDtypeStruct``s from the model's
``init`` (``jax.eval_shape``), the packed params come from tracing the real packer
(`packed.packed_shapes`), so ``param_bytes`` is the sum of ``nbytes`` of exactly the arrays a
frozen model holds (the tests check this against materialised trees on a small config).
``peak_bytes`` is ``compiled.memory_analysis()`` of one jitted UNet forward lowered on abstract
inputs: arguments + outputs + XLA temporaries (minus aliasing). On CPU XLA under-reports fused
temporaries, so CPU peaks are lower bounds.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.deploy.layers import Deployed
from mixdq_jax.deploy.packed import DeployPlan, layer_kernel, packed_shapes
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, example_inputs, param_shapes
from mixdq_jax.quant.forward import forward, unet_arguments
from mixdq_jax.quant.lowrank import LowRank
from mixdq_jax.quant.modes import Float
from mixdq_jax.quant.qconfig import FLOAT_BITS, QuantSpec
from mixdq_jax.quant.registry import build_registry, layer_splits


def tree_nbytes(tree: Any) -> int:
    """Sum of ``nbytes`` over the leaves (arrays or ``ShapeDtypeStruct``s)."""
    return int(
        sum(
            int(np.prod(leaf.shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
            for leaf in jax.tree.leaves(tree)
        )
    )


def plan_for_spec(
    config: UNetConfig, spec: QuantSpec, float_params: Any
) -> tuple[DeployPlan, dict[str, np.ndarray]]:
    """Plan and placeholder activation ranges ([-1, 1]) of ``spec`` on a UNet architecture:
    ranges change values, never shapes, so they are irrelevant to memory."""
    splits = layer_splits(build_registry(config))
    ranges = {
        n: np.array([[-1.0, 1.0]] * (2 if s is not None else 1), np.float32)
        for n, s in splits.items()
    }
    qconfig = spec.to_qconfig(splits, ranges)
    plan = DeployPlan.from_qconfig(qconfig, float_params)
    act = {n: ranges[n] for n in plan.layers}
    return plan, act


def lowrank_shapes(
    config: UNetConfig, rank: int, *, layers: Any = None
) -> dict[str, LowRank]:
    """``{layer: LowRank}`` of ``jax.ShapeDtypeStruct``s: a rank-``rank`` decomposition of
    every Dense/Conv of a UNet architecture (or of ``layers``), as `quant.lowrank.decompose`
    shapes it (rank capped at the kernel's GEMM sides). A ``QuantSpec(group_size=...,
    lowrank=...)`` holding these measures storage and BOPs with no weights."""
    splits = layer_splits(build_registry(config))
    names = list(splits) if layers is None else list(layers)
    params = param_shapes(UNet2DConditionModel(config=config))
    return {name: LowRank.shapes(tuple(layer_kernel(params, name).shape), rank) for name in names}


def stored_param_bytes(
    config: UNetConfig, spec: QuantSpec | None, *, float_dtype: Any = jnp.float16
) -> int:
    """Bytes of the UNet params as ``mixdq export`` stores them for ``spec`` (packed weights,
    scales, zero points, column sums, BOS rows, every other param in ``float_dtype``); the
    float UNet for ``spec=None``. Traced with shapes only: nothing is materialised.

    SVDQuant's group format (``spec.group_size``) counts its group scales (f32 per group of
    input channels and output channel), its smoothing vectors and low-rank branches (fp16;
    `spec.lowrank` may hold arrays or the shapes of :func:`lowrank_shapes`)."""
    float_dtype = jnp.dtype(float_dtype)
    model = UNet2DConditionModel(config=config, dtype=float_dtype, param_dtype=float_dtype)
    float_params = param_shapes(model)
    if spec is None:
        return tree_nbytes(float_params)
    plan, act = plan_for_spec(config, spec, float_params)
    bos_dim = config.per_block("cross_attention_dim")[0]
    return tree_nbytes(
        packed_shapes(float_params, plan, act, float_dtype=float_dtype, bos_dim=bos_dim)
    )


def abstract_forward_inputs(config: UNetConfig, latent: int, dtype: Any) -> dict[str, Any]:
    inputs = example_inputs(config, batch=1, height=latent, width=latent)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), inputs)


def compiled_memory(model: UNet2DConditionModel, plan: DeployPlan | None, params, inputs):
    """``memory_analysis`` of one jitted forward on abstract ``params`` / ``inputs``."""

    mode = Float() if plan is None else Deployed(plan=plan)

    def run(p, kw):
        return forward(model, p, None, *unet_arguments(kw), mode=mode)

    stats = jax.jit(run).lower(params, inputs).compile().memory_analysis()
    if stats is None:
        return {"peak_bytes": None}
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    reported = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
    return {
        "peak_bytes": int(max(total, reported)),
        "argument_bytes": int(stats.argument_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "output_bytes": int(stats.output_size_in_bytes),
    }


def memory_table(
    unet_config: str | Path | Mapping[str, Any] | UNetConfig,
    *,
    weight_bits: str | Path | Mapping[str, int] | None = None,
    latent: int = 64,
    float_dtype: Any = jnp.float16,
    symmetric_weights: bool = True,
    peak: bool = True,
) -> dict[str, Any]:
    """Memory of FP16 / W8A8 / W4A8 (/ the mixed ``weight_bits`` file, activations at 8 bits)
    for a UNet architecture; one entry per configuration with ``param_bytes``, ``peak_bytes``
    and the FP16 ratio. ``latent``: the latent side (64 = 512x512 images for SDXL)."""
    if isinstance(unet_config, UNetConfig):
        config = unet_config
    elif isinstance(unet_config, Mapping):
        config = UNetConfig.from_dict(unet_config)
    else:
        config = UNetConfig.from_json(unet_config)
    float_dtype = jnp.dtype(float_dtype)
    model = UNet2DConditionModel(config=config, dtype=float_dtype, param_dtype=float_dtype)
    float_params = param_shapes(model)
    inputs = abstract_forward_inputs(config, latent, float_dtype)
    specs: dict[str, QuantSpec | None] = {
        "fp16" if float_dtype == jnp.float16 else float_dtype.name: None,
        "w8a8": QuantSpec(weight_bits=8, act_bits=8, symmetric_weights=symmetric_weights),
        "w4a8": QuantSpec(weight_bits=4, act_bits=8, symmetric_weights=symmetric_weights),
    }
    if weight_bits is not None:
        if not isinstance(weight_bits, Mapping):
            from mixdq_jax.official_format import read_bits  # noqa: PLC0415
            from mixdq_jax.quant.qconfig import QUANT_BITS  # noqa: PLC0415

            weight_bits = read_bits(weight_bits, allowed=QUANT_BITS)
        specs["mixed"] = QuantSpec(
            weight_bits=dict(weight_bits),
            default_weight_bits=FLOAT_BITS,
            act_bits=8,
            symmetric_weights=symmetric_weights,
        )
    bos_dim = config.per_block("cross_attention_dim")[0]
    entries: dict[str, Any] = {}
    base = None
    for name, spec in specs.items():
        t0 = time.perf_counter()
        if spec is None:
            plan, params = None, float_params
        else:
            plan, act = plan_for_spec(config, spec, float_params)
            params = packed_shapes(
                float_params, plan, act, float_dtype=float_dtype, bos_dim=bos_dim
            )
        entry: dict[str, Any] = {"param_bytes": tree_nbytes(params)}
        if plan is not None:
            bits = [lp.w_bits for lp in plan.layers.values()]
            entry["quantized_layers"] = len(plan.layers)
            entry["storage_bits"] = {
                str(b): sum(lp.storage_bits == b for lp in plan.layers.values()) for b in (2, 4, 8)
            }
            entry["mean_weight_bits"] = _mean_bits(plan, float_params)
            del bits
        base = entry["param_bytes"] if base is None else base
        entry["ratio_vs_float"] = round(base / entry["param_bytes"], 3)
        if peak:
            entry.update(compiled_memory(model, plan, params, inputs))
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        entries[name] = entry
    return {
        "backend": jax.default_backend(),
        "latent": [latent, latent],
        "batch": 1,
        "float_dtype": float_dtype.name,
        "symmetric_weights": symmetric_weights,
        "peak_note": (
            "compiled memory_analysis of one UNet forward (arguments + outputs + temporaries). "
            "On CPU these are lower bounds (XLA:CPU under-reports fused temporaries) and are "
            "inflated by CPU-only copies: XLA:CPU computes fp16 in f32 (f32 copies of the "
            "weights) and its W4/W2 fallback unpacks whole weight matrices to int8, which the "
            "GPU Pallas kernel does per tile"
        ),
        "configs": entries,
    }


def _mean_bits(plan: DeployPlan, float_params: Any) -> float:
    """Weight-element-weighted mean of the quantized layers' bits (the paper's "W3.66")."""
    num = den = 0
    for lp in plan.layers.values():
        n = int(np.prod(lp.weight_shape))
        num += n * min(lp.w_bits, FLOAT_BITS)
        den += n
    return round(num / den, 3) if den else float(FLOAT_BITS)
