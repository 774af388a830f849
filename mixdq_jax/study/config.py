"""What the study runs, as data: the targets (table row groups) and the methods (rows).

Methods come from the registry (`mixdq_jax.methods`): the study is a loop over (target, method)
calling the same code as `mixdq quantize`, plus the testbed's judge on held-out captions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mixdq_jax.methods import METHODS, AllocationOptions, Method, Target
from mixdq_jax.recipe.config import PRESETS, Preset
from mixdq_jax.reconstruction import ReconConfig

if TYPE_CHECKING:
    from mixdq_jax.evaluation.run import ReportEval

DEFAULT_TARGETS = tuple(
    Target.parse(name) for name in ("W8A8", "W5A8", "W4A8", "W4A16", "W3.66A16")
)
# Table 3's ablation at W8A8, one technique added per row.
ABLATION = ("naive", "naive+bos", "sqnr-mp", "mixdq")
# Table 2: the reconstruction baselines at W8A8 beside naive PTQ and MixDQ.
RECONSTRUCTION_TABLE = ("naive", "ptqd", "qdiffusion", "edadm", "mixdq")


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """What the study runs. Defaults fit the testbed in minutes on a laptop CPU.
    ``evaluation``: the paper's metrics for every row as well (on another model than the
    testbed, instead of the testbed's judge, which scores testbed images only).
    ``methods`` may add the reconstruction rows (`RECONSTRUCTION_METHODS`: Q-Diffusion, PTQD,
    EDA-DM, MixDQ + AdaRound), learned with ``reconstruction``'s settings. ``preset`` /
    ``knobs``: as `mixdq quantize --preset` and its allocation options."""

    model: str = "testbed"
    run_dir: Path = Path("runs/demo")
    num_calib: int = 16
    num_eval: int = 64
    num_select: int = 8  # held-out captions that pick among candidates (image MSE vs float)
    steps: int = 1
    seed: int = 0
    targets: tuple[Target, ...] = DEFAULT_TARGETS
    methods: tuple[Method, ...] = tuple(METHODS.values())
    chunk: int = 16
    evaluation: ReportEval | None = None
    reconstruction: ReconConfig = field(default_factory=ReconConfig)
    preset: Preset = PRESETS["ours"]
    knobs: AllocationOptions | None = None  # None: the preset's (`Preset.knobs`)

    @property
    def swept(self) -> bool:
        """Whether some row allocates from the sensitivity sweeps (rows that quantize every
        layer alike need none, nor does their report's sensitivity plot)."""
        return any(m.allocator.uses_scores for m in self.methods)

    @property
    def judged(self) -> bool:
        """Whether the testbed's judge scores the rows."""
        return self.evaluation is None or self.model == "testbed"
