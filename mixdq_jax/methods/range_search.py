"""The ``range_search`` refiner: Q-Diffusion's clipping-range search before reconstruction.

Q-Diffusion's quantizers start from ``scale_method 'mse'`` (`mixdq_jax.quant.range_search`):
per output channel for weights, per tensor for activations, the shrunk min/max range of lowest
Lp error (p = 2.4) among 80 ratios. Here the weights' choice is stored as clipped float kernels
and the activations' as ordinary ranges (``act_ranges`` and the configuration's ``a_range``),
so the reconstruction that follows starts from them (AdaRound rounds the clipped kernel on its
grid, LSQ starts its step from the searched range) and fake quantization, export and the
integer path run them unchanged. Resumable: ``RUN/quantize/<key>/range_search/`` holds the
chosen ratios (``weights.npz``, ``acts.npz``).

Simplified against upstream: activation inputs are observed with every activation float and
the weights at nearest rounding of the clipped kernels (upstream initialises each activation
quantizer on 16 calibration samples with the learned weights and the earlier activations
quantized, after the weight reconstruction), and the errors are summed over every calibration
sample.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mixdq_jax.deploy.packed import layer_kernel, with_layer_kernel
from mixdq_jax.io_utils import atomic_write_bytes
from mixdq_jax.methods.refiner import RefineContext, Refiner
from mixdq_jax.quant.qconfig import FLOAT_BITS
from mixdq_jax.quant.quantized import QuantizedUNet
from mixdq_jax.quant.range_search import (
    UPSTREAM_CANDIDATES,
    UPSTREAM_P,
    UPSTREAM_STEP,
    clip_kernel,
    clip_ratios,
    search_act_ranges,
    search_weight_clip,
    with_act_ranges,
)
from mixdq_jax.reconstruction.blocks import unet_apply
from mixdq_jax.reconstruction.samples import unet_samples

WEIGHTS_FILE, ACTS_FILE = "weights.npz", "acts.npz"


@dataclass(frozen=True, kw_only=True)
class RangeSearch(Refiner):
    """Search weight (``weights``) and activation (``acts``) clipping ranges among
    ``candidates`` ratios ``1 - step * i`` of the min/max range for the lowest Lp error
    (``p``); defaults are Q-Diffusion's."""

    name: ClassVar[str] = "range_search"
    weights: bool = True
    acts: bool = True
    candidates: int = UPSTREAM_CANDIDATES
    step: float = UPSTREAM_STEP
    p: float = UPSTREAM_P

    def __post_init__(self) -> None:
        clip_ratios(self.candidates, self.step)  # the grid's own check
        if self.p <= 0.0:
            raise ValueError(f"RangeSearch: p {self.p} must be > 0")

    @property
    def ratios(self) -> np.ndarray:
        return clip_ratios(self.candidates, self.step)

    def refine(self, model: QuantizedUNet, ctx: RefineContext) -> QuantizedUNet:
        if model.qconfig is None:
            raise ValueError("range search: the model has no quantization configuration")
        store = ctx.store(self.name)
        if self.weights:
            model = self._weights(model, store / WEIGHTS_FILE)
        if self.acts:
            model = self._acts(model, ctx, store / ACTS_FILE)
        return model

    def _weights(self, model: QuantizedUNet, path: Path) -> QuantizedUNet:
        w_bits, _ = model.qconfig.bits()
        fmt, ratios = model.qconfig.weight_format, self.ratios
        chosen = _load(path)
        todo = [n for n, b in w_bits.items() if b < FLOAT_BITS and n not in chosen]
        for name in todo:
            kernel = layer_kernel(model.params, name)
            chosen[name] = search_weight_clip(kernel, w_bits[name], ratios, p=self.p, fmt=fmt,
                                              split=model.qconfig.layers[name].split)  # fmt: skip
        if todo:
            _save(path, {n: a.astype(np.int16) for n, a in chosen.items()})
        params = model.params
        for name, index in chosen.items():
            kernel = layer_kernel(params, name)
            lq = model.qconfig.layers[name]
            parts = 1 if lq.split is None else 2
            want = (parts, kernel.shape[-1])
            if index.shape != want:
                raise ValueError(f"{path}: {name!r} has ratios of shape {index.shape}, the "
                                 f"layer {want}; delete the file to search again")  # fmt: skip
            params = with_layer_kernel(params, name, clip_kernel(kernel, ratios[index],
                                                                 split=lq.split))  # fmt: skip
        return model.replace(params=params)

    def _acts(self, model: QuantizedUNet, ctx: RefineContext, path: Path) -> QuantizedUNet:
        _, a_bits = model.qconfig.bits()
        names = [n for n, b in a_bits.items() if b < FLOAT_BITS]
        if not names:
            return model
        stored = _load(path)
        if not stored:
            found = search_act_ranges(unet_apply(ctx.pipe.unet), model.params, model.qconfig,
                                      unet_samples(ctx.pipe, ctx.calibration),
                                      ratios=self.ratios, p=self.p,
                                      batch_size=ctx.recon.batch_size, names=names)  # fmt: skip
            stored = {f"range/{n}": r for n, r in found.ranges.items()}
            stored.update({f"index/{n}": i.astype(np.int16) for n, i in found.index.items()})
            _save(path, stored)
        ranges = {n[len("range/") :]: r for n, r in stored.items() if n.startswith("range/")}
        missing = sorted(set(names) - set(ranges))
        if missing:
            raise ValueError(f"{path}: no searched range for {missing[:5]}; delete the file to "
                             "search again")  # fmt: skip
        return model.replace(qconfig=with_act_ranges(model.qconfig, ranges),
                             act_ranges={**model.act_ranges, **ranges})  # fmt: skip

    def report(self, model: QuantizedUNet, ctx: RefineContext) -> dict[str, Any]:
        """How many weight channels and activation tensors were clipped, and by how much."""
        store, ratios = ctx.store(self.name), self.ratios
        weights = [ratios[i].ravel() for i in _load(store / WEIGHTS_FILE).values()]
        acts = [ratios[i].ravel() for n, i in _load(store / ACTS_FILE).items()
                if n.startswith("index/")]  # fmt: skip
        out: dict[str, Any] = {}
        for what, found in (("weight_channels", weights), ("act_tensors", acts)):
            if found:
                r = np.concatenate(found)
                out[what] = {"searched": int(r.size), "clipped": int(np.sum(r < 1.0)),
                             "median_ratio": float(np.median(r))}  # fmt: skip
        return {self.name: out}


def _load(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a finished search, or ``{}`` (none yet, or a damaged file: searched again)."""
    try:
        with np.load(path) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return {}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
