"""Per-layer sensitivity sweeps (MixDQ sec. 3.2): quantize one layer alone, measure the damage.

For every layer, every candidate bit-width and weights or activations separately (the other
stays float), the sweep measures

- ``"sqnr"``: SQNR in dB of the UNet output against the float output, on the calibration run's
  stored float UNet inputs of every sampling step (per UNet-batch row: summed over the steps'
  squared errors and references, then ``10 log10(ref / err)``; averaged over the rows;
  capped at ``SQNR_CAP_DB`` for an exactly zero error);
- ``"ssim"``: global SSIM (the whole image one window, :func:`mixdq_jax.metrics.ssim_global`)
  of the decoded images against the float images, re-running the whole sampling loop and the
  VAE from the stored latents and conditioning with the calibration's step noise; averaged
  over the images.

Higher is better for both (less sensitive). ``metrics="mixdq"`` measures what MixDQ and the
official release use: SQNR for every layer and SSIM for the content layers (cross-attention and
feed-forward); ``"sqnr"`` is SQNR only (the "MP-only" baseline's metric); ``("sqnr", "ssim")``
both metrics for every layer.

How it runs: the configurations are data. Each single-layer configuration is the all-float
``QConfig`` with one layer's bits replaced (``QConfig.with_bits``); a chunk of them is stacked
along a leading axis and evaluated by one jitted function that ``jax.vmap``s over the
configurations inside a ``jax.shard_map`` whose mesh spans every device
(``jax.devices()``): the configuration axis is sharded, the parameters and calibration data are
replicated, and no device talks to another. Only the swept kind's bit-widths carry the
configuration axis (``split_swept``), so an activation sweep shares every kernel across the
configurations. One compile per (metric, kind) serves the whole sweep (one per
calibration-batch shape). Each finished chunk is written atomically to
``RUN/sensitivity/<kind>/<metric>_<n>.npz`` (its layers, bits and values; see
`mixdq_jax.rundir`); a restarted sweep reads the finished ones and only evaluates what is
missing, whatever chunk size or device count it now runs with. The results land in the
official YAML format ``RUN/sensitivity/<kind>_<metric>.yaml`` (``{model.<layer>: [s2, s4, s8]}``).

Multi-GPU and multi-host: on one machine the mesh simply covers all local GPUs. On a cluster,
start the same command on every host (same model, same RUN directory on a shared filesystem)
and call ``jax.distributed.initialize()`` before anything else touches JAX (the
``mixdq sensitivity --distributed`` flag does it; under SLURM, Open MPI or Kubernetes it finds
the coordinator, process count and rank itself, otherwise pass ``--coordinator HOST:PORT
--num-processes N --process-id I``). ``jax.devices()`` then lists every host's devices, each
host evaluates its shard of every chunk, process 0 decides which chunks remain (broadcast to
the others) and writes the files. ``chunk`` is rounded up to a multiple of the global device
count. (The multi-host path follows JAX's multi-controller rules but was only run here on one
host with 8 virtual devices.)
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from mixdq_jax.io_utils import atomic_write_text
from mixdq_jax.official_format import SENSITIVITY_BITS, write_sensitivity
from mixdq_jax.pipeline import Pipeline
from mixdq_jax.quant.qconfig import QConfig
from mixdq_jax.quant.registry import unet_layers
from mixdq_jax.rundir import RunDir
from mixdq_jax.sensitivity.calibration import load_calibration
from mixdq_jax.sensitivity.config import Scores, SweepConfig
from mixdq_jax.sensitivity.configs import base_qconfig, single_layer_qconfigs
from mixdq_jax.sensitivity.evaluator import Evaluator


def _is_main() -> bool:
    return jax.process_index() == 0


def _agree(mask: np.ndarray) -> np.ndarray:
    """Every process takes process 0's view of which tasks are done."""
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.broadcast_one_to_all(mask))


def sweep(
    pipe: Pipeline,
    run_dir: str | os.PathLike | RunDir,
    config: SweepConfig | None = None,
    *,
    mesh: Mesh | None = None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
) -> dict[tuple[str, str], Scores]:
    """Run (or resume) the sensitivity sweep of ``pipe`` on the calibrated ``run_dir``.

    Returns ``{(kind, metric): {layer: scores at config.bits}}`` and writes
    ``RUN/sensitivity/<kind>_<metric>.yaml`` (see :func:`write_scores`). ``evaluator``: reuse
    the compiled programs of an earlier sweep of the same pipeline and run (default: a new one
    on ``mesh``).
    """
    config = config or SweepConfig()
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    calib = load_calibration(run, pipe) if evaluator is None else evaluator.calib
    layers = list(unet_layers(pipe.unet.config))
    if config.layers is not None:
        known = {layer.name for layer in layers}
        unknown = [n for n in config.layers if n not in known]
        if unknown:
            raise ValueError(f"SweepConfig.layers: unknown layer(s) {unknown[:20]}")
        wanted = set(config.layers)
        layers = [layer for layer in layers if layer.name in wanted]
    subset = None if config.layers is None else [layer.name for layer in layers]
    base = base_qconfig(pipe, config.spec, calib.ranges, subset)
    if evaluator is None:
        evaluator = Evaluator(pipe, calib, mesh)
    chunk = math.ceil(config.chunk / evaluator.size) * evaluator.size
    meta = {
        "calibration": calib.meta,
        "weight_format": base.weight_format,
        "act_format": base.act_format,
        "bos_aware": config.spec.bos_aware,
        "shortcut_split": config.spec.shortcut_split,
    }
    if config.sqnr != "mean_db":  # recorded only when set: earlier runs resume unchanged
        meta["sqnr"] = config.sqnr
    if config.spec.group_size is not None:  # the low-rank group format (its own folder)
        meta["group_size"] = config.spec.group_size
        meta["lowrank"] = config.spec.lowrank is not None
    results: dict[tuple[str, str], Scores] = {}
    for kind in config.kinds:
        run.start_sweep(kind, meta, write=_is_main())
        for metric, metric_names in config.metric_layers(layers).items():
            results[kind, metric] = _sweep_one(
                evaluator,
                base,
                kind,
                metric,
                metric_names,
                config.bits,
                chunk,
                run,
                progress,
                sqnr=config.sqnr,
            )
            write_scores(run, kind, metric, results[kind, metric], config.bits)
    return results


def _sweep_one(
    evaluator: Evaluator,
    base: QConfig,
    kind: str,
    metric: str,
    names: Sequence[str],
    bits: Sequence[int],
    chunk: int,
    run: RunDir,
    progress: bool,
    *,
    sqnr: str = "mean_db",
) -> Scores:
    tasks = [(name, b) for name in names for b in bits]
    done = run.read_chunks(kind, metric)
    mask = _agree(np.asarray([t in done for t in tasks], dtype=bool))
    todo = [t for t, m in zip(tasks, mask, strict=True) if not m]
    existing = int(_agree(np.asarray(run.next_chunk_number(kind, metric))))
    bar = tqdm(
        total=len(tasks),
        initial=len(tasks) - len(todo),
        desc=f"sensitivity {kind} {metric}",
        unit="cfg",
        disable=not (progress and _is_main()),
        file=sys.stderr,
    )
    with bar:
        for i, start in enumerate(range(0, len(todo), chunk)):
            part = todo[start : start + chunk]
            padded = part + [part[-1]] * (chunk - len(part))  # fixed shape: one compile
            values = evaluator.evaluate(
                metric, kind, single_layer_qconfigs(base, kind, padded), sqnr=sqnr
            )
            values = values[: len(part)]
            if _is_main():
                run.write_chunk(kind, metric, existing + i, part, values)
            done.update(zip(part, (float(v) for v in values), strict=True))
            bar.update(len(part))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices(f"sensitivity {kind} {metric}")
    scores = {name: tuple(done[name, b] for b in bits) for name in names}
    bad = sorted(n for n, s in scores.items() if not all(math.isfinite(v) for v in s))
    if bad:
        raise ValueError(
            f"sensitivity {kind} {metric}: non-finite scores for {len(bad)} layer(s): "
            f"{', '.join(bad[:20])}"
        )
    return scores


def write_scores(
    run: str | os.PathLike | RunDir, kind: str, metric: str, scores: Scores, bits: Sequence[int]
) -> Path | None:
    """Write ``RUN/sensitivity/<kind>_<metric>.yaml`` (official format, bits (2, 4, 8)) or,
    for other bit sets, ``.json`` (``{"bits": [...], "scores": {layer: [...]}}``); only on
    process 0 (returns None elsewhere)."""
    if not _is_main():
        return None
    run = run if isinstance(run, RunDir) else RunDir(run)
    official = tuple(bits) == SENSITIVITY_BITS
    path = run.scores_path(kind, metric, official=official)
    if official:
        write_sensitivity(path, scores)
        return path
    payload = {"bits": list(bits), "scores": {n: list(s) for n, s in sorted(scores.items())}}
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path


__all__ = ["sweep", "write_scores"]
