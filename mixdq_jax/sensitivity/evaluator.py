"""The jitted, vmapped and sharded metric programs of a sweep (one compile per metric and
kind): SQNR of the UNet output and global SSIM of the decoded images under a stacked batch of
configurations, the configuration axis sharded over a 1-D device mesh."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixdq_jax.compile_events import first_call
from mixdq_jax.metrics import ssim_global
from mixdq_jax.pipeline import Pipeline
from mixdq_jax.quant.forward import forward
from mixdq_jax.quant.qconfig import QConfig
from mixdq_jax.sensitivity.calibration import CalibBatch, CalibData
from mixdq_jax.sensitivity.config import METRICS, SQNR_AGGREGATES, SQNR_CAP_DB
from mixdq_jax.sensitivity.configs import is_swept_leaf, split_swept, swept_attrs

AXIS = "cfg"  # the mesh axis the configurations are sharded over

Array = jax.Array


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


class Evaluator:
    """The jitted, vmapped and sharded metric functions of one pipeline and calibration run.

    ``evaluate(metric, kind, qconfigs)`` takes a stacked configuration (leading axis =
    configurations, a multiple of the mesh size) and returns one value per configuration. One
    program per (metric, kind) is compiled and reused for every chunk.
    """

    def __init__(self, pipe: Pipeline, calib: CalibData, mesh: Mesh | None = None) -> None:
        self.pipe = pipe
        self.calib = calib
        self.mesh = mesh if mesh is not None else default_mesh()
        self.size = self.mesh.devices.size
        self._rep = NamedSharding(self.mesh, PartitionSpec())
        self.plan = jax.tree.map(jnp.asarray, pipe.scheduler.set_timesteps(calib.steps))
        self.do_cfg = pipe.uses_cfg(calib.guidance)
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
            attr = swept_attrs(kind)
            one, n_data = {"sqnr": (self._sqnr_one, 3), "ssim": (self._ssim_one, 4)}[metric]
            axes = jax.tree_util.tree_map_with_path(
                lambda p, x: 0 if is_swept_leaf(p, attr) else None, qconfig
            )
            specs = jax.tree_util.tree_map_with_path(
                lambda p, x: PartitionSpec(AXIS) if is_swept_leaf(p, attr) else PartitionSpec(),
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
        attr = swept_attrs(kind)
        shardings = jax.tree_util.tree_map_with_path(
            lambda p, x: NamedSharding(self.mesh, PartitionSpec(AXIS))
            if is_swept_leaf(p, attr)
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
            out = forward(self.pipe.unet, params["unet"], qconfig, inp, t, cond)
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
            return self.pipe.sample_step(
                params["unet"], qconfig, plan, i, x, cond, g, key, cfg=self.do_cfg
            )[0]

        x = jax.lax.fori_loop(0, plan.num_inference_steps, body, latents * plan.init_noise_sigma)
        images = self.pipe.decode_with(params["vae"], x)
        return ssim_global(images, ref_images, data_range=1.0)

    def _batch_data(self, b: CalibBatch) -> dict[str, Any]:
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
        parts = []
        for b in self.calib.batches:
            args = (self.params, qc, *self._batch_data(b)[metric])
            with first_call(f"the {kind} {metric} sensitivity program", fn, *args):
                parts.append(fn(*args))
        return np.concatenate([_fetch(p) for p in parts], axis=1).astype(np.float64)

    def sqnr_db(self, kind: str, qconfigs: QConfig, *, aggregate: str = "mean_db") -> np.ndarray:
        """``[n]`` SQNR in dB (capped at ``SQNR_CAP_DB``). ``aggregate``: ``"mean_db"``, per
        UNet row ``10 log10(ref / err)`` over all steps, averaged over the rows (the paper's
        "averaged over 32 prompts"); ``"ratio_of_sums"``, one ``10 log10(sum ref / sum err)``
        over every row (the released code's ``LossFunction`` on the whole batch)."""
        if aggregate not in SQNR_AGGREGATES:
            raise ValueError(f"SQNR aggregate {aggregate!r}: expected one of {SQNR_AGGREGATES}")
        err = self._run("sqnr", kind, qconfigs)
        ref = self.ref_energy[None]
        if aggregate == "ratio_of_sums":
            err, ref = err.sum(axis=1, keepdims=True), ref.sum(axis=1, keepdims=True)
        err = np.maximum(err, ref * 10.0 ** (-SQNR_CAP_DB / 10.0))
        return np.mean(10.0 * np.log10(ref / err), axis=1)

    def ssim(self, kind: str, qconfigs: QConfig) -> np.ndarray:
        """``[n]`` global SSIM vs the float images, averaged over all calibration images."""
        return np.mean(self._run("ssim", kind, qconfigs), axis=1)

    def evaluate(
        self, metric: str, kind: str, qconfigs: QConfig, *, sqnr: str = "mean_db"
    ) -> np.ndarray:
        """``[n]`` values of ``metric`` for stacked single-layer configurations of ``kind``
        (``sqnr``: how SQNR aggregates over the rows, :meth:`sqnr_db`)."""
        if metric == "sqnr":
            return self.sqnr_db(kind, qconfigs, aggregate=sqnr)
        if metric == "ssim":
            return self.ssim(kind, qconfigs)
        raise ValueError(f"unknown metric {metric!r} (expected one of {METRICS})")
