"""The ``adaround`` refiner: learned rounding by block reconstruction (BRECQ + AdaRound + LSQ).

Q-Diffusion's recipe, and MixDQ's bits with learned rounding: the chosen configuration is
reconstructed unit by unit on the calibration run's UNet inputs (every sampling step:
`mixdq_jax.reconstruction.samples`), resumable in ``RUN/quantize/<key>/reconstruct/``. EDA-DM
adds two parts as options: ``calib_select`` keeps the calibration samples its TDAC chooses
per sampling step (every sample at one step), ``layer_loss_weight`` adds the inner layers'
output errors to each block's loss. EDA-DM's released run also sets TDAC's ``tdac_lambda``,
the number of calibration prompts (``calib_samples``) and its own learning rates
(``weight_lr``, ``weight_lr_w8`` for 8-bit weights, ``act_lr``), which then replace the run's
``--recon-lr`` and activation rate. What comes out is what the later stages already run:
float UNet params whose nearest rounding is the learned codes, and learned activation ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import jax
import numpy as np

from mixdq_jax.io_utils import atomic_write_json
from mixdq_jax.methods.refiner import RefineContext, Refiner
from mixdq_jax.quant.qconfig import FLOAT_BITS, QConfig
from mixdq_jax.quant.quantized import QuantizedUNet
from mixdq_jax.reconstruction import reconstruct, unet_apply
from mixdq_jax.reconstruction.calib_select import CalibSelect, feature_fn, select
from mixdq_jax.reconstruction.samples import sample_positions, unet_samples


@dataclass(frozen=True, kw_only=True)
class BlockReconstruction(Refiner):
    """Learned rounding with the run's `ReconConfig`; ``calib_select`` / ``layer_loss_weight``:
    EDA-DM's TDAC and fine-grained block reconstruction; ``tdac_lambda``: TDAC's variety
    weight (None: `CalibSelect`'s); ``calib_samples``: TDAC spreads the first that many
    calibration prompts (None: every one; more than the run has is an error);
    ``weight_lr`` / ``act_lr``: replace the run's rates (``weight_lr_w8`` where every quantized
    weight has 8 bits); ``p``: replaces the run's Lp loss exponent of the activation phase
    (EDA-DM's released run: 2); ``label``: what the settings are, as reports name them."""

    name: ClassVar[str] = "adaround"
    calib_select: bool = False
    layer_loss_weight: float = 0.0
    tdac_lambda: float | None = None
    calib_samples: int | None = None
    weight_lr: float | None = None
    weight_lr_w8: float | None = None
    act_lr: float | None = None
    p: float | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if self.layer_loss_weight < 0.0:
            raise ValueError(f"layer_loss_weight {self.layer_loss_weight} must be >= 0")
        if self.tdac_lambda is not None and self.tdac_lambda < 0.0:
            raise ValueError(f"tdac_lambda {self.tdac_lambda} must be >= 0")
        if self.calib_samples is not None and self.calib_samples < 1:
            raise ValueError(f"calib_samples {self.calib_samples} must be >= 1")
        for name in ("weight_lr", "weight_lr_w8", "act_lr", "p"):
            value = getattr(self, name)
            if value is not None and value <= 0.0:
                raise ValueError(f"{name} {value} must be > 0")
        if not self.calib_select and (self.tdac_lambda, self.calib_samples) != (None, None):
            raise ValueError("tdac_lambda and calib_samples are TDAC's: set calib_select=True")

    def refine(self, model: QuantizedUNet, ctx: RefineContext) -> QuantizedUNet:
        pipe, calib = ctx.pipe, ctx.calibration
        config = self.recon_config(ctx.recon, model.qconfig)
        if config != ctx.recon:
            ctx.log(f"reconstruction settings of {self.label or self.name} in place of the "
                    f"run's: lr {config.lr:g}, act_lr {config.act_lr:g}, layer loss weight "
                    f"{config.layer_loss_weight:g}")  # fmt: skip
        data = unet_samples(pipe, calib)
        if self.calib_select:
            data, per_step = tdac_samples(pipe, calib, data, seed=config.seed,
                                          lam=self.tdac_lambda,
                                          samples=self.calib_samples)  # fmt: skip
            # what TDAC chose, beside the reconstruction it fed
            atomic_write_json(ctx.run.recipe_dir(ctx.key) / "calib_select.json",
                              {"samples_per_step": per_step})  # fmt: skip
            ctx.log(f"EDA-DM's TDAC: calibration samples per sampling step {per_step}")
        # the float UNet is what blocks match, also when an earlier refiner clipped kernels
        res = reconstruct(unet_apply(pipe.unet), model.params, model.qconfig, data,
                          config=config, run=ctx.run, key=ctx.key, progress=ctx.progress,
                          reference=pipe.params["unet"])  # fmt: skip
        return model.replace(params=res.params, qconfig=res.qconfig,
                             act_ranges={**model.act_ranges, **res.act_ranges})  # fmt: skip

    def recon_config(self, run_config: Any, qconfig: QConfig) -> Any:
        """The run's `ReconConfig` with this refiner's settings in place of its own."""
        changes: dict[str, Any] = {}
        if self.layer_loss_weight:
            changes["layer_loss_weight"] = self.layer_loss_weight
        lr = self.weight_lr
        if self.weight_lr_w8 is not None and _weights_all_8bit(qconfig):
            lr = self.weight_lr_w8
        if lr is not None:
            changes["lr"] = lr
        if self.act_lr is not None:
            changes["act_lr"] = self.act_lr
        if self.p is not None:
            changes["p"] = self.p
        return replace(run_config, **changes) if changes else run_config

    def settings(self) -> dict[str, Any]:
        """``rounding`` (and EDA-DM's parts only when set, as runs before them recorded)."""
        out: dict[str, Any] = {"rounding": "adaround"}
        if self.calib_select:
            out["calib_select"] = True
        if self.layer_loss_weight:
            out["layer_loss_weight"] = self.layer_loss_weight
        for name in ("tdac_lambda", "calib_samples", "weight_lr", "weight_lr_w8", "act_lr",
                     "p", "label"):  # fmt: skip
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def report(self, model: QuantizedUNet, ctx: RefineContext) -> dict[str, Any]:
        return {"rounding": "adaround"}


def _weights_all_8bit(qconfig: QConfig) -> bool:
    """Whether every quantized weight has 8 bits or more (EDA-DM's W8A8 learning rate)."""
    bits = [b for b in qconfig.bits()[0].values() if b < FLOAT_BITS]
    return bool(bits) and min(bits) >= 8


def prompt_of_trajectory(calib: Any) -> np.ndarray:
    """The calibration prompt of every trajectory (`sample_positions`' numbering): a batch's
    rows are its prompts, twice (``[negative; positive]``) with classifier-free guidance."""
    out, offset = [], 0
    for batch in calib.batches:
        prompts, rows = batch.latents.shape[0], batch.inputs.shape[1]
        out.append(offset + np.arange(rows) % prompts)
        offset += prompts
    return np.concatenate(out)


def tdac_samples(
    pipe: Any,
    calib: Any,
    data: Any,
    *,
    seed: int = 0,
    lam: float | None = None,
    samples: int | None = None,
) -> tuple[Any, list[int]]:
    """EDA-DM's TDAC: ``(the samples of data it keeps, how many per sampling step)``: one
    per trajectory (`unet_samples` order) of the first ``samples`` prompts (None: every
    prompt), spread over the steps by the float UNet's latent feature maps with variety
    weight ``lam`` (None: `CalibSelect`'s); all of them at one step."""
    step_of, trajectory_of = sample_positions(calib)
    pool = np.arange(step_of.size)
    if samples is not None:
        prompt_of = prompt_of_trajectory(calib)
        have = int(prompt_of.max()) + 1
        if have < samples:
            raise ValueError(
                f"EDA-DM's TDAC takes {samples} calibration prompts (one sample each; the "
                f"released MS-COCO run calibrates on 256) and this run's calibration has "
                f"{have}: calibrate with --num-calib {samples} (another --run), or use "
                "--method edadm-testbed (every prompt of the run's calibration)"
            )
        pool = np.flatnonzero(prompt_of[trajectory_of] < samples)
    features = feature_fn(unet_apply(pipe.unet), pipe.params["unet"], data)
    config = CalibSelect(seed=seed) if lam is None else CalibSelect(seed=seed, lam=lam)
    keep = pool[select(step_of[pool], trajectory_of[pool], lambda i: features(pool[i]), config)]
    per_step = np.bincount(step_of[keep], minlength=calib.steps).tolist()
    if keep.size == step_of.size:
        return data, per_step
    return jax.tree.map(lambda a: a[keep], data), per_step
