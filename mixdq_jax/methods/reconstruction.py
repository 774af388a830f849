"""The ``adaround`` refiner: learned rounding by block reconstruction (BRECQ + AdaRound + LSQ).

Q-Diffusion's recipe, and MixDQ's bits with learned rounding: the chosen configuration is
reconstructed unit by unit on the calibration run's UNet inputs (every sampling step:
`mixdq_jax.reconstruction.samples`), resumable in ``RUN/quantize/<key>/reconstruct/``. EDA-DM
adds two parts as options: ``calib_select`` keeps the calibration samples its TDAC chooses
per sampling step (every sample at one step), ``layer_loss_weight`` adds the inner layers'
output errors to each block's loss. What comes out is what the later stages already run:
float UNet params whose nearest rounding is the learned codes, and learned activation ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import jax
import numpy as np

from mixdq_jax.io_utils import atomic_write_json
from mixdq_jax.methods.refiner import RefineContext, Refiner
from mixdq_jax.quant.quantized import QuantizedUNet
from mixdq_jax.reconstruction import reconstruct, unet_apply
from mixdq_jax.reconstruction.calib_select import CalibSelect, feature_fn, select
from mixdq_jax.reconstruction.samples import sample_positions, unet_samples


@dataclass(frozen=True, kw_only=True)
class BlockReconstruction(Refiner):
    """Learned rounding with the run's `ReconConfig`; ``calib_select`` / ``layer_loss_weight``:
    EDA-DM's TDAC and fine-grained block reconstruction."""

    name: ClassVar[str] = "adaround"
    calib_select: bool = False
    layer_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.layer_loss_weight < 0.0:
            raise ValueError(f"layer_loss_weight {self.layer_loss_weight} must be >= 0")

    def refine(self, model: QuantizedUNet, ctx: RefineContext) -> QuantizedUNet:
        pipe, calib, config = ctx.pipe, ctx.calibration, ctx.recon
        data = unet_samples(pipe, calib)
        if self.calib_select:
            data, per_step = tdac_samples(pipe, calib, data, seed=config.seed)
            # what TDAC chose, beside the reconstruction it fed
            atomic_write_json(ctx.run.recipe_dir(ctx.key) / "calib_select.json",
                              {"samples_per_step": per_step})  # fmt: skip
            ctx.log(f"EDA-DM's TDAC: calibration samples per sampling step {per_step}")
        if self.layer_loss_weight:
            config = replace(config, layer_loss_weight=self.layer_loss_weight)
        res = reconstruct(unet_apply(pipe.unet), model.params, model.qconfig, data,
                          config=config, run=ctx.run, key=ctx.key,
                          progress=ctx.progress)  # fmt: skip
        return model.replace(params=res.params, qconfig=res.qconfig,
                             act_ranges={**model.act_ranges, **res.act_ranges})  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """``rounding`` (and EDA-DM's parts only when set, as runs before them recorded)."""
        out: dict[str, Any] = {"rounding": "adaround"}
        if self.calib_select:
            out["calib_select"] = True
        if self.layer_loss_weight:
            out["layer_loss_weight"] = self.layer_loss_weight
        return out

    def report(self, model: QuantizedUNet, ctx: RefineContext) -> dict[str, Any]:
        return {"rounding": "adaround"}


def tdac_samples(pipe: Any, calib: Any, data: Any, *, seed: int = 0) -> tuple[Any, list[int]]:
    """EDA-DM's TDAC: ``(the samples of data it keeps, how many per sampling step)``: one
    per trajectory (`unet_samples` order), spread over the steps by the float UNet's latent
    feature maps; all of them at one step."""
    step_of, trajectory_of = sample_positions(calib)
    features = feature_fn(unet_apply(pipe.unet), pipe.params["unet"], data)
    keep = select(step_of, trajectory_of, features, CalibSelect(seed=seed))
    per_step = np.bincount(step_of[keep], minlength=calib.steps).tolist()
    if keep.size == step_of.size:
        return data, per_step
    return jax.tree.map(lambda a: a[keep], data), per_step
