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
``RUN/sensitivity/<kind>/<metric>_<n>.npz`` (its layers, bits and values); a restarted sweep
reads the finished ones and only evaluates what is missing, whatever chunk size or device
count it now runs with. The results land in the official YAML format
``RUN/sensitivity/<kind>_<metric>.yaml`` (``{model.<layer>: [s2, s4, s8]}``).

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from mixdq_jax.io_utils import atomic_open, atomic_write_json, atomic_write_text
from mixdq_jax.metrics import ssim_global
from mixdq_jax.official_format import SENSITIVITY_BITS, write_sensitivity
from mixdq_jax.pipeline import seed_keys
from mixdq_jax.quant.apply import fake_quant_context
from mixdq_jax.quant.calibrate import load_act_ranges, load_references
from mixdq_jax.quant.qconfig import FLOAT_BITS, QUANT_BITS, QConfig, QuantSpec
from mixdq_jax.quant.quantize import qconfig_for, unet_layers

KINDS: tuple[str, ...] = ("weight", "act")
METRICS: tuple[str, ...] = ("sqnr", "ssim")
SQNR_CAP_DB = 200.0  # float32 outputs cannot resolve more; an exactly zero error maps here
AXIS = "cfg"  # the mesh axis the configurations are sharded over

Array = jax.Array
Scores = dict[str, tuple[float, ...]]  # {layer: (score at bits[0], bits[1], ...)}


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    """What to sweep.

    ``metrics``: ``"mixdq"`` (SQNR for every layer, SSIM for content layers), ``"sqnr"``,
    ``"ssim"`` (that metric for every layer), or a tuple of ``"sqnr"``/``"ssim"`` (each for
    every layer). ``spec`` carries the quantizer flags (BOS-aware, shortcut split, symmetric
    or FP8 formats); its bit-widths are ignored (the base configuration is all float).
    ``layers`` restricts the sweep to some layers (``None``: all); the configuration then holds
    only those (the others run untouched, exactly as at float bits), which compiles and runs
    faster than the whole model's configuration.
    ``chunk`` configurations are evaluated per call (rounded up to a multiple of the devices);
    each device holds ``chunk / devices`` copies of the activations of one calibration batch
    (for SSIM: through the VAE decoder too), so on SDXL start with one or two per device.
    """

    kinds: tuple[str, ...] = KINDS
    bits: tuple[int, ...] = SENSITIVITY_BITS
    metrics: str | tuple[str, ...] = "mixdq"
    chunk: int = 8
    spec: QuantSpec = field(default_factory=QuantSpec)
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"SweepConfig: kinds must be among {KINDS}, got {kinds!r}")
        bits = tuple(int(b) for b in self.bits)
        object.__setattr__(self, "bits", bits)
        if not bits or any(b not in QUANT_BITS for b in bits) or len(set(bits)) != len(bits):
            raise ValueError(
                f"SweepConfig: bits must be distinct values in {list(QUANT_BITS)}, got {bits}"
            )
        if isinstance(self.metrics, str):
            if self.metrics not in ("mixdq", *METRICS):
                raise ValueError(
                    f"SweepConfig: metrics must be 'mixdq', 'sqnr', 'ssim' or a tuple of "
                    f"'sqnr'/'ssim', got {self.metrics!r}"
                )
        else:
            metrics = tuple(self.metrics)
            if not metrics or any(m not in METRICS for m in metrics):
                raise ValueError(f"SweepConfig: metrics tuple must hold 'sqnr'/'ssim': {metrics}")
            object.__setattr__(self, "metrics", metrics)
        if self.chunk < 1:
            raise ValueError(f"SweepConfig: chunk must be >= 1, got {self.chunk}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def metric_layers(self, layers: Sequence[Any]) -> dict[str, list[str]]:
        """``{metric: [layer names]}`` for registry ``LayerInfo``s, in registry order."""
        names = [layer.name for layer in layers]
        if self.metrics == "mixdq":
            return {
                "sqnr": names,
                "ssim": [layer.name for layer in layers if layer.group == "content"],
            }
        metrics = (self.metrics,) if isinstance(self.metrics, str) else self.metrics
        return {m: list(names) for m in metrics}


# --------------------------------------------------------------------------- run-dir data
@dataclass(frozen=True, kw_only=True)
class _Batch:
    """One calibration batch's float references (CFG rows in the pipeline's [neg; pos] order)."""

    index: int
    latents: np.ndarray  # [B, C, h, w]
    context: np.ndarray  # [R, 77, D]  (R = 2B with CFG, else B)
    pooled: np.ndarray | None  # [R, P]
    inputs: np.ndarray  # [S, R, C, h, w] the UNet inputs of every step
    outputs: np.ndarray  # [S, R, C, h, w] the float UNet outputs
    images: np.ndarray  # [B, H, W, 3]
    key_noise: np.ndarray  # raw key data of the calibration's step noise


@dataclass(frozen=True, kw_only=True)
class CalibData:
    """A calibration run as the sweep needs it."""

    meta: dict[str, Any]
    ranges: dict[str, np.ndarray]
    batches: tuple[_Batch, ...]
    steps: int
    guidance: float
    height: int
    width: int


def load_calibration(run_dir: str | os.PathLike, pipe: Any) -> CalibData:
    """The float references of a complete calibration run, checked against ``pipe``."""
    run = Path(run_dir)
    meta_path = run / "calib" / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{run}: not a calibrated run directory (no calib/meta.json); run "
            f"`mixdq calibrate --model MODEL --run {run}` first"
        )
    ranges = load_act_ranges(run)  # written last: its presence means calibration finished
    meta = json.loads(meta_path.read_text())
    cfg = meta["config"]
    steps, guidance = int(cfg["num_inference_steps"]), float(cfg["guidance_scale"])
    plan = pipe.scheduler.set_timesteps(steps)
    with np.load(run / "calib" / "batch_00000.npz") as first:
        stored_t = first["timesteps"]
    if stored_t.shape != np.shape(plan.timesteps) or not np.allclose(
        stored_t, np.asarray(plan.timesteps)
    ):
        raise ValueError(
            f"{run}: calibrated with timesteps {stored_t.tolist()} but this pipeline's scheduler "
            f"gives {np.asarray(plan.timesteps).tolist()}; load the model with the scheduler "
            "used for calibration (--scheduler)"
        )
    known = {layer.name for layer in unet_layers(pipe)}
    if set(ranges) != known:
        raise ValueError(
            f"{run}: calibrated layers differ from this model's ({len(ranges)} vs {len(known)}); "
            "was it calibrated with another model?"
        )
    refs = load_references(run)
    cfg_on = pipe._do_cfg(guidance)
    n, bs = len(cfg["prompts"]), int(cfg["batch_size"])
    sizes = [min(bs, n - s) for s in range(0, n, bs)]
    batches, row, lat = [], 0, 0
    for b, size in enumerate(sizes):
        rows = 2 * size if cfg_on else size
        sl, rl = slice(lat, lat + size), slice(row, row + rows)
        batches.append(
            _Batch(
                index=b,
                latents=refs["latents"][sl],
                context=refs["context"][rl],
                pooled=refs["pooled"][rl] if "pooled" in refs else None,
                inputs=refs["unet_inputs"][:, rl],
                outputs=refs["unet_outputs"][:, rl],
                images=refs["images"][sl],
                key_noise=np.asarray(jax.random.key_data(seed_keys(int(cfg["seed"]) + b)[1])),
            )
        )
        lat, row = lat + size, row + rows
    if lat != refs["latents"].shape[0] or row != refs["unet_inputs"].shape[1]:
        raise ValueError(f"{run}: calibration batches do not match calib/meta.json")
    return CalibData(
        meta=meta,
        ranges=ranges,
        batches=tuple(batches),
        steps=steps,
        guidance=guidance,
        height=int(cfg["height"]),
        width=int(cfg["width"]),
    )


# --------------------------------------------------------------------------- configurations
def base_qconfig(
    pipe: Any,
    spec: QuantSpec,
    ranges: Mapping[str, Any],
    layers: Sequence[str] | None = None,
) -> QConfig:
    """The all-float configuration (with the calibrated ranges) that sweeps start from, of
    every layer or of ``layers`` only (a layer absent from a config runs untouched)."""
    spec = replace(
        spec,
        weight_bits=FLOAT_BITS,
        act_bits=FLOAT_BITS,
        default_weight_bits=None,
        default_act_bits=None,
        protected_weights=frozenset(),
        protected_acts=frozenset(),
    )
    qc = qconfig_for(pipe, spec, ranges)
    if layers is not None:
        qc = replace(qc, layers={n: qc.layers[n] for n in layers})
    return qc


def single_layer_qconfigs(base: QConfig, kind: str, tasks: Sequence[tuple[str, int]]) -> QConfig:
    """``stack_qconfigs([base.with_bits(...{layer: bits}) for layer, bits in tasks])``, built
    with numpy in one pass (a chunk holds thousands of leaves; one device transfer later)."""
    n = len(tasks)
    stacked = jax.tree.map(lambda x: np.repeat(np.asarray(x)[None], n, axis=0), base)
    attr = "w_bits" if kind == "weight" else "a_bits"
    for j, (name, bits) in enumerate(tasks):
        getattr(stacked.layers[name], attr)[j] = bits
    return stacked


# --------------------------------------------------------------------------- evaluation
def _quant_context(qconfig: QConfig):
    return fake_quant_context(qconfig)


def default_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process)."""
    devs = list(jax.devices() if devices is None else devices)
    return Mesh(np.asarray(devs, dtype=object), (AXIS,))


def _put(tree: Any, sharding: Any) -> Any:
    """Place host or single-device data with ``sharding`` (one sharding, or a tree of them
    matching ``tree``); every process holds the same data."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x, sh):
        arr = np.asarray(x)
        return jax.make_array_from_callback(arr.shape, sh, lambda idx: arr[idx])

    if isinstance(sharding, NamedSharding):
        return jax.tree.map(lambda x: one(x, sharding), tree)
    return jax.tree.map(one, tree, sharding)


def _fetch(x: Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _bits_attr(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return "w_bits" if kind == "weight" else "a_bits"


def _swept_leaf(path: tuple, attr: str) -> bool:
    return getattr(path[-1], "name", None) == attr


def split_swept(qconfigs: QConfig, kind: str) -> QConfig:
    """A stacked single-layer configuration with the configuration axis kept only on the swept
    kind's bit-widths (the other leaves are equal across configurations: their first row).

    Why: under ``vmap`` a batched weight bit-width batches that layer's kernel, so an activation
    sweep would carry one copy of every kernel per configuration; with only ``a_bits`` batched
    the kernels stay shared and each layer runs as one large op over all configurations.
    """
    attr = _bits_attr(kind)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x if _swept_leaf(p, attr) else x[0], qconfigs
    )


class Evaluator:
    """The jitted, vmapped and sharded metric functions of one pipeline and calibration run.

    ``evaluate(metric, kind, qconfigs)`` takes a stacked configuration (leading axis =
    configurations, a multiple of the mesh size) and returns one value per configuration. One
    program per (metric, kind) is compiled and reused for every chunk.
    """

    def __init__(self, pipe: Any, calib: CalibData, mesh: Mesh | None = None) -> None:
        self.pipe = pipe
        self.qpipe = pipe.with_quantization(_quant_context, None)
        self.calib = calib
        self.mesh = mesh if mesh is not None else default_mesh()
        self.size = self.mesh.devices.size
        self._rep = NamedSharding(self.mesh, PartitionSpec())
        self.plan = jax.tree.map(jnp.asarray, pipe.scheduler.set_timesteps(calib.steps))
        self.do_cfg = pipe._do_cfg(calib.guidance)
        self.params = _put({"unet": pipe.params["unet"], "vae": pipe.params["vae"]}, self._rep)
        self._data: dict[int, dict[str, Any]] = {}
        self.functions: dict[tuple, Callable] = {}  # (metric, kind, treedef) -> program
        # reference energy per UNet row, summed over steps (float64, on the host)
        self.ref_energy = np.concatenate(
            [
                np.sum(np.square(b.outputs.astype(np.float64)), axis=(0, *range(2, b.outputs.ndim)))
                for b in calib.batches
            ]
        )

    def function(self, metric: str, kind: str, qconfig: QConfig) -> Callable:
        """The compiled program of ``metric`` for a ``split_swept`` configuration of ``kind``."""
        key = (metric, kind, jax.tree.structure(qconfig))
        fn = self.functions.get(key)
        if fn is None:
            attr = _bits_attr(kind)
            one, n_data = {"sqnr": (self._sqnr_one, 3), "ssim": (self._ssim_one, 4)}[metric]
            axes = jax.tree_util.tree_map_with_path(
                lambda p, x: 0 if _swept_leaf(p, attr) else None, qconfig
            )
            specs = jax.tree_util.tree_map_with_path(
                lambda p, x: PartitionSpec(AXIS) if _swept_leaf(p, attr) else PartitionSpec(),
                qconfig,
            )
            rep = PartitionSpec()
            batched = jax.vmap(one, in_axes=(None, axes, *([None] * n_data)))
            mapped = jax.shard_map(
                batched,
                mesh=self.mesh,
                in_specs=(rep, specs, *([rep] * n_data)),
                out_specs=PartitionSpec(AXIS),
                check_vma=False,
            )
            fn = self.functions[key] = jax.jit(mapped)
        return fn

    def place(self, qconfig: QConfig, kind: str) -> QConfig:
        attr = _bits_attr(kind)
        shardings = jax.tree_util.tree_map_with_path(
            lambda p, x: NamedSharding(self.mesh, PartitionSpec(AXIS))
            if _swept_leaf(p, attr)
            else self._rep,
            qconfig,
        )
        return _put(qconfig, shardings)

    def _cond(self, context: Array, pooled: Array | None) -> dict[str, Any]:
        c = self.calib
        return self.pipe.conditioning(context, pooled, c.guidance, c.height, c.width)

    def _sqnr_one(self, params, qconfig, inputs, outputs, emb):
        """Squared error of the UNet output per row, summed over steps and elements."""
        cond = self._cond(*emb)

        def body(err, xs):
            inp, ref, t = xs
            out = self.qpipe.unet_apply(params["unet"], qconfig, inp, t, cond)
            d = out.astype(jnp.float32) - ref.astype(jnp.float32)
            return err + jnp.sum(d * d, axis=tuple(range(1, d.ndim))), None

        timesteps = jnp.asarray(self.plan.timesteps)
        err, _ = jax.lax.scan(
            body, jnp.zeros(inputs.shape[1], jnp.float32), (inputs, outputs, timesteps)
        )
        return err

    def _ssim_one(self, params, qconfig, latents, emb, key_data, ref_images):
        """Global SSIM per image of the whole sampling loop + VAE decode under ``qconfig``."""
        cond = self._cond(*emb)
        key = jax.random.wrap_key_data(key_data)
        g = jnp.float32(self.calib.guidance)
        plan = self.plan

        def body(i, x):
            return self.qpipe.sample_step(
                params["unet"], qconfig, plan, i, x, cond, g, key, cfg=self.do_cfg
            )[0]

        x = jax.lax.fori_loop(0, plan.num_inference_steps, body, latents * plan.init_noise_sigma)
        images = self.pipe._decode(params["vae"], x)
        return ssim_global(images, ref_images, data_range=1.0)

    def _batch_data(self, b: _Batch) -> dict[str, Any]:
        data = self._data.get(b.index)
        if data is None:
            emb = (b.context, b.pooled)
            data = self._data[b.index] = _put(
                {
                    "sqnr": (b.inputs, b.outputs, emb),
                    "ssim": (b.latents, emb, b.key_noise, b.images),
                },
                self._rep,
            )
        return data

    def _run(self, metric: str, kind: str, qconfigs: QConfig) -> np.ndarray:
        """Per-configuration outputs of every calibration batch, concatenated on axis 1."""
        qc = split_swept(qconfigs, kind)
        fn = self.function(metric, kind, qc)
        qc = self.place(qc, kind)
        parts = [fn(self.params, qc, *self._batch_data(b)[metric]) for b in self.calib.batches]
        return np.concatenate([_fetch(p) for p in parts], axis=1).astype(np.float64)

    def sqnr_db(self, kind: str, qconfigs: QConfig) -> np.ndarray:
        """``[n]`` SQNR in dB: per UNet row ``10 log10(ref / err)`` over all steps (capped at
        ``SQNR_CAP_DB``), averaged over the rows."""
        err = self._run("sqnr", kind, qconfigs)
        ref = self.ref_energy[None]
        err = np.maximum(err, ref * 10.0 ** (-SQNR_CAP_DB / 10.0))
        return np.mean(10.0 * np.log10(ref / err), axis=1)

    def ssim(self, kind: str, qconfigs: QConfig) -> np.ndarray:
        """``[n]`` global SSIM vs the float images, averaged over all calibration images."""
        return np.mean(self._run("ssim", kind, qconfigs), axis=1)

    def evaluate(self, metric: str, kind: str, qconfigs: QConfig) -> np.ndarray:
        """``[n]`` values of ``metric`` for stacked single-layer configurations of ``kind``."""
        if metric == "sqnr":
            return self.sqnr_db(kind, qconfigs)
        if metric == "ssim":
            return self.ssim(kind, qconfigs)
        raise ValueError(f"unknown metric {metric!r} (expected one of {METRICS})")


def _evaluator(pipe: Any, run_dir: str | os.PathLike, calib: CalibData, mesh: Mesh | None):
    """The pipeline's evaluator for this run and mesh, cached so resumed or partial sweeps in
    one process reuse the compiled programs."""
    mesh = mesh if mesh is not None else default_mesh()
    stamp = (Path(run_dir) / "calib" / "act_ranges.npz").stat().st_mtime_ns
    key = (
        "sensitivity_evaluator",
        str(Path(run_dir).resolve()),
        stamp,
        tuple(d.id for d in mesh.devices.flat),
    )
    if key not in pipe._cache:
        pipe._cache[key] = Evaluator(pipe, calib, mesh)
    return pipe._cache[key]


# --------------------------------------------------------------------------- chunk files
def _sweep_dir(run_dir: str | os.PathLike, kind: str) -> Path:
    return Path(run_dir) / "sensitivity" / kind


def _read_chunks(folder: Path, metric: str) -> dict[tuple[str, int], float]:
    done: dict[tuple[str, int], float] = {}
    for path in sorted(folder.glob(f"{metric}_*.npz")):
        with np.load(path) as data:
            for name, bits, value in zip(data["layers"], data["bits"], data["values"], strict=True):
                done[str(name), int(bits)] = float(value)
    return done


def _write_chunk(path: Path, tasks: Sequence[tuple[str, int]], values: np.ndarray) -> None:
    with atomic_open(path) as f:
        np.savez(
            f,
            layers=np.asarray([t[0] for t in tasks]),
            bits=np.asarray([t[1] for t in tasks], np.int32),
            values=np.asarray(values, np.float64),
        )


def _check_meta(folder: Path, meta: dict[str, Any]) -> None:
    path = folder / "meta.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old != meta:
            raise ValueError(
                f"{path}: this run's sweep was started with other quantizer settings or another "
                f"calibration ({old} vs {meta}); delete {folder} or use a new --run directory"
            )
    elif jax.process_index() == 0:
        atomic_write_json(path, meta)


def _is_main() -> bool:
    return jax.process_index() == 0


def _agree(mask: np.ndarray) -> np.ndarray:
    """Every process takes process 0's view of which tasks are done."""
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return np.asarray(multihost_utils.broadcast_one_to_all(mask))


# --------------------------------------------------------------------------- the sweep
def sweep(
    pipe: Any,
    run_dir: str | os.PathLike,
    config: SweepConfig | None = None,
    *,
    mesh: Mesh | None = None,
    progress: bool = True,
) -> dict[tuple[str, str], Scores]:
    """Run (or resume) the sensitivity sweep of ``pipe`` on the calibrated ``run_dir``.

    Returns ``{(kind, metric): {layer: scores at config.bits}}`` and writes
    ``RUN/sensitivity/<kind>_<metric>.yaml`` (see :func:`write_scores`).
    """
    config = config or SweepConfig()
    calib = load_calibration(run_dir, pipe)
    layers = unet_layers(pipe)
    if config.layers is not None:
        known = {layer.name for layer in layers}
        unknown = [n for n in config.layers if n not in known]
        if unknown:
            raise ValueError(f"SweepConfig.layers: unknown layer(s) {unknown[:20]}")
        wanted = set(config.layers)
        layers = [layer for layer in layers if layer.name in wanted]
    subset = None if config.layers is None else [layer.name for layer in layers]
    base = base_qconfig(pipe, config.spec, calib.ranges, subset)
    evaluator = _evaluator(pipe, run_dir, calib, mesh)
    chunk = math.ceil(config.chunk / evaluator.size) * evaluator.size
    meta = {
        "calibration": calib.meta,
        "weight_format": base.weight_format,
        "act_format": base.act_format,
        "bos_aware": config.spec.bos_aware,
        "shortcut_split": config.spec.shortcut_split,
    }
    results: dict[tuple[str, str], Scores] = {}
    for kind in config.kinds:
        folder = _sweep_dir(run_dir, kind)
        folder.mkdir(parents=True, exist_ok=True)
        _check_meta(folder, meta)
        for metric, metric_names in config.metric_layers(layers).items():
            results[kind, metric] = _sweep_one(
                evaluator, base, kind, metric, metric_names, config.bits, chunk, folder, progress
            )
            folder_out = Path(run_dir) / "sensitivity"
            write_scores(folder_out, kind, metric, results[kind, metric], config.bits)
    return results


def _sweep_one(
    evaluator: Evaluator,
    base: QConfig,
    kind: str,
    metric: str,
    names: Sequence[str],
    bits: Sequence[int],
    chunk: int,
    folder: Path,
    progress: bool,
) -> Scores:
    tasks = [(name, b) for name in names for b in bits]
    done = _read_chunks(folder, metric)
    mask = _agree(np.asarray([t in done for t in tasks], dtype=bool))
    todo = [t for t, m in zip(tasks, mask, strict=True) if not m]
    existing = 1 + max((int(p.stem.split("_")[-1]) for p in folder.glob(f"{metric}_*.npz")),
                       default=-1)  # fmt: skip
    existing = int(_agree(np.asarray(existing)))  # the next free file number
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
            values = evaluator.evaluate(metric, kind, single_layer_qconfigs(base, kind, padded))
            values = values[: len(part)]
            if _is_main():
                _write_chunk(folder / f"{metric}_{existing + i:05d}.npz", part, values)
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
    folder: str | os.PathLike, kind: str, metric: str, scores: Scores, bits: Sequence[int]
) -> Path | None:
    """Write ``<kind>_<metric>.yaml`` (official format, bits (2, 4, 8)) or, for other bit
    sets, ``<kind>_<metric>.json`` (``{"bits": [...], "scores": {layer: [...]}}``); only on
    process 0 (returns None elsewhere)."""
    if not _is_main():
        return None
    folder = Path(folder)
    if tuple(bits) == SENSITIVITY_BITS:
        path = folder / f"{kind}_{metric}.yaml"
        write_sensitivity(path, scores)
        return path
    path = folder / f"{kind}_{metric}.json"
    payload = {"bits": list(bits), "scores": {n: list(s) for n, s in sorted(scores.items())}}
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path


__all__ = [
    "KINDS",
    "METRICS",
    "SQNR_CAP_DB",
    "CalibData",
    "Evaluator",
    "Scores",
    "SweepConfig",
    "base_qconfig",
    "default_mesh",
    "load_calibration",
    "single_layer_qconfigs",
    "split_swept",
    "sweep",
    "write_scores",
]
