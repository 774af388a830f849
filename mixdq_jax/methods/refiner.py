"""The refiner protocol: a step that improves a quantized UNet after its bits are chosen.

A refiner takes the `QuantizedUNet` of the chosen bits and returns a better one: learned
rounding by block reconstruction (`reconstruction.BlockReconstruction`: Q-Diffusion, EDA-DM),
PTQD's noise correction (`ptqd.PTQDCorrection`), or your own (`examples/custom_method.py`
searches each layer's weight clipping range). A method runs its refiners in order in the
recipe's ``reconstruct`` stage; each writes what it needs to resume into its own folder
(``ctx.store(name)``).
"""

from __future__ import annotations

import abc
import dataclasses
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mixdq_jax.quant.quantized import QuantizedUNet

if TYPE_CHECKING:
    from mixdq_jax.pipeline import Pipeline
    from mixdq_jax.reconstruction import ReconConfig
    from mixdq_jax.rundir import RunDir
    from mixdq_jax.sensitivity.calibration import CalibData


@dataclass(frozen=True, kw_only=True)
class RefineContext:
    """What a refiner may read: the float pipeline, the run directory and this recipe's key
    (``<target>_<method>``), the reconstruction settings of the run, the calibration."""

    pipe: Pipeline
    run: RunDir
    key: str
    recon: ReconConfig
    progress: bool = True

    @cached_property
    def calibration(self) -> CalibData:
        """The calibration run's UNet inputs and float outputs, every sampling step."""
        from mixdq_jax.sensitivity.calibration import load_calibration  # noqa: PLC0415

        return load_calibration(self.run, self.pipe)

    def store(self, name: str) -> Path:
        """``RUN/quantize/<key>/<name>/``: a refiner's own files (created)."""
        path = self.run.recipe_dir(self.key) / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, message: str) -> None:
        print(f"[mixdq quantize] {message}", file=sys.stderr, flush=True)


class Refiner(abc.ABC):
    """One refinement step. Subclass as a frozen keyword-only dataclass; ``name`` is what
    settings and reports call it."""

    name: ClassVar[str]

    @abc.abstractmethod
    def refine(self, model: QuantizedUNet, ctx: RefineContext) -> QuantizedUNet:
        """The refined model (run or resumed from ``ctx.store``)."""

    def settings(self) -> dict[str, Any]:
        """What a resumed run must match: ``{name: fields}`` by default."""
        fields = dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}
        return {self.name: fields or True}

    def report(self, model: QuantizedUNet, ctx: RefineContext) -> dict[str, Any]:
        """Entries this step adds to the recipe's report.json (JSON values)."""
        return {}
