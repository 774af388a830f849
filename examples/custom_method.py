"""A method of your own, in one file: MixDQ's bits plus a weight clipping-range search.

Registers the method ``example``: MixDQ's metric-decoupled allocation, then a refiner that
searches each quantized layer's weight clipping range for the lowest quantization error of
its weight: one ratio of every output channel's min/max per layer, the Lp error (p = 2.4)
averaged over the channels, scored by the library's `weight_clip_errors` (the built-in
`RangeSearch` of ``qdiffusion`` picks a ratio per channel, as Q-Diffusion does). The clipped
kernels are ordinary float params, so fake quantization, export and the integer path run
them unchanged. Run it through the whole recipe (calibrate, sweep, allocate, refine, export,
report)::

    mixdq quantize --plugin examples/custom_method.py --method example \\
        --model testbed --target W4A8 --run runs/example --out runs/example-out

or from Python: ``import examples.custom_method`` (or `mixdq_jax.methods.load_plugin`), then
``mixdq_jax.recipe.quantize(..., method=get_method("example"))``. Nothing inside
``mixdq_jax/`` changes: a method is an allocator, refiners and a format in the registry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from mixdq_jax.io_utils import atomic_write_json
from mixdq_jax.methods import (
    Method,
    MixDQGroups,
    QuantizedUNet,
    RefineContext,
    Refiner,
    layer_kernel,
    register_method,
    with_layer_kernel,
)
from mixdq_jax.quant.range_search import clip_kernel, weight_clip_errors


@dataclass(frozen=True, kw_only=True)
class ClipSearch(Refiner):
    """Per quantized layer, the clipping ratio of ``ratios`` with the lowest Lp error of its
    quantized weight (``p``: Q-Diffusion's 2.4). Chosen ratios are written to
    ``RUN/quantize/<key>/clip_search/ratios.json`` as they are found, so a killed run
    resumes."""

    name: ClassVar[str] = "clip_search"
    ratios: tuple[float, ...] = tuple(np.round(np.linspace(1.0, 0.5, 11), 4))
    p: float = 2.4

    def refine(self, model: QuantizedUNet, ctx: RefineContext) -> QuantizedUNet:
        path = ctx.store(self.name) / "ratios.json"
        chosen: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}
        w_bits, _ = model.qconfig.bits()
        fmt = model.qconfig.weight_format
        ratios = jnp.asarray(self.ratios, jnp.float32)
        params = model.params
        for name, bits in w_bits.items():
            if bits >= 16:
                continue
            kernel, split = layer_kernel(params, name), model.qconfig.layers[name].split
            if name not in chosen:
                errors = weight_clip_errors(
                    kernel, jnp.int32(bits), ratios, p=self.p, fmt=fmt, split=split
                )  # [ratios, parts, out]
                score = np.asarray(errors).reshape(len(self.ratios), -1).mean(axis=1)
                chosen[name] = float(self.ratios[int(np.argmin(score))])
                atomic_write_json(path, chosen)
            if chosen[name] < 1.0:
                params = with_layer_kernel(
                    params, name, clip_kernel(kernel, chosen[name], split=split)
                )
        return model.replace(params=params)

    def settings(self) -> dict[str, Any]:
        return {self.name: {"ratios": list(self.ratios), "p": self.p}}

    def report(self, model: QuantizedUNet, ctx: RefineContext) -> dict[str, Any]:
        chosen = json.loads((ctx.store(self.name) / "ratios.json").read_text())
        clipped = [r for r in chosen.values() if r < 1.0]
        return {
            "clip_search": {
                "layers": len(chosen),
                "clipped": len(clipped),
                "median_ratio": float(np.median(list(chosen.values()))),
            }
        }


EXAMPLE = register_method(
    Method(name="example", title="MixDQ + clip search", allocator=MixDQGroups(),
           refiners=(ClipSearch(),))
)  # fmt: skip
