"""Preparing a low-rank format's per-layer data: smoothing statistics and the alpha search.

One pass over the calibration run's stored UNet inputs (every batch and step, the layers in
float) records each layer's per-channel input absmax and an evenly spaced sample of its
patch rows (`mixdq_jax.quant.modes.CollectInputs`); then, layer by layer, the migration
strength of least output error at the branch's bits is searched (`mixdq_jax.quant.lowrank`).
Each layer's result is written to ``RUN/lowrank/<format>/layers/`` as it finishes, so a killed
search resumes with the layers left (the statistics pass, cheap, runs again).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mixdq_jax.deploy.packed import layer_kernel
from mixdq_jax.methods.format import Format
from mixdq_jax.quant.forward import forward
from mixdq_jax.quant.lowrank import LowRank, search
from mixdq_jax.quant.modes import CollectInputs
from mixdq_jax.quant.qconfig import QuantSpec
from mixdq_jax.quant.registry import layer_splits, unet_layers
from mixdq_jax.rundir import RunDir

if TYPE_CHECKING:
    from mixdq_jax.pipeline import Pipeline
    from mixdq_jax.sensitivity.calibration import CalibData


def _statistics(
    pipe: Pipeline, calib: CalibData, names: Sequence[str], rows: int, bos_aware: bool
) -> dict[str, np.ndarray]:
    """``{layer: absmax (cin,), layer#rows: [rows, positions, cin]}`` over the calibration."""
    registry = unet_layers(pipe.unet.config)
    splits = {n: s for n, s in layer_splits(registry).items() if n in set(names)}
    qconfig = QuantSpec(bos_aware=bos_aware).to_qconfig(splits)
    calls = sum(b.inputs.shape[0] for b in calib.batches)
    mode = CollectInputs(rows=max(1, math.ceil(rows / calls)))
    plan = pipe.scheduler.set_timesteps(calib.steps)
    params = pipe.params["unet"]

    @jax.jit
    def collect(params, sample, t, context, pooled):  # params an argument: not a 10 GB constant
        cond = pipe.conditioning(context, pooled, calib.guidance, calib.height, calib.width)
        return forward(pipe.unet, params, qconfig, sample, t, cond, mode=mode)[1]

    stats: dict[str, np.ndarray] = {}
    for b in calib.batches:
        for s in range(b.inputs.shape[0]):
            pooled = None if b.pooled is None else jnp.asarray(b.pooled)
            got = collect(params, jnp.asarray(b.inputs[s]), jnp.asarray(plan.timesteps[s]),
                          jnp.asarray(b.context), pooled)  # fmt: skip
            for key, value in got.items():
                value = np.asarray(value, np.float32)
                if key not in stats:
                    stats[key] = value
                elif key.endswith("#rows"):
                    stats[key] = np.concatenate([stats[key], value])
                else:
                    stats[key] = np.maximum(stats[key], value)
    return stats


def _to_lowrank(arrays: dict[str, np.ndarray]) -> LowRank:
    return LowRank(smooth=jnp.asarray(arrays["smooth"]), down=jnp.asarray(arrays["down"]),
                   up=jnp.asarray(arrays["up"]))  # fmt: skip


def prepare(
    pipe: Pipeline,
    run: RunDir,
    calib: CalibData,
    fmt: Format,
    *,
    bos_aware: bool = True,
    progress: bool = True,
) -> dict[str, LowRank]:
    """Every quantizable layer's `LowRank` for ``fmt`` (run, or read from the run)."""
    settings = fmt.lowrank
    if settings is None or fmt.group_size is None:
        raise ValueError(f"format {fmt.name} has no low-rank branch to prepare")
    tag = fmt.tag if bos_aware else f"{fmt.tag}-nobos"  # BOS handling changes the statistics
    run.start_lowrank(tag, {"format": fmt.settings(), "bos_aware": bos_aware,
                            "calibration": calib.meta.get("config")})  # fmt: skip
    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    out: dict[str, LowRank] = {}
    todo = []
    for name in names:
        stored = run.lowrank_layer(tag, name)
        if stored is None:
            todo.append(name)
        else:
            out[name] = _to_lowrank(stored)
    if todo:
        stats = _statistics(pipe, calib, todo, settings.rows, bos_aware)
        kernels = _kernels(pipe, todo)
        w_bits, a_bits = settings.search_bits
        bar = tqdm(
            total=len(names), initial=len(names) - len(todo), unit="layer",
            desc=f"low-rank search ({tag})", disable=not progress, file=sys.stderr,
        )  # fmt: skip
        with bar:
            for name in todo:
                kernel = kernels[name]
                k, n = math.prod(kernel.shape[:-1]), kernel.shape[-1]
                lowrank, alpha, errors = search(
                    kernel, stats[name], stats[f"{name}#rows"][: settings.rows],
                    rank=settings.layer_rank(k, n), group=fmt.group_size, alphas=settings.alphas,
                    w_bits=w_bits, a_bits=a_bits,
                )  # fmt: skip
                arrays = {"smooth": np.asarray(lowrank.smooth), "down": np.asarray(lowrank.down),
                          "up": np.asarray(lowrank.up), "alpha": np.float32(alpha),
                          "errors": errors}  # fmt: skip
                run.write_lowrank_layer(tag, name, arrays)
                out[name] = _to_lowrank(arrays)
                bar.update(1)
    return {name: out[name] for name in names}


def _kernels(pipe: Pipeline, names: Sequence[str]) -> dict[str, jax.Array]:
    """The float kernels of ``names`` from the UNet params (by diffusers module name)."""
    return {name: layer_kernel(pipe.params["unet"], name) for name in names}
