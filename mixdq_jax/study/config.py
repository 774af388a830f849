"""What the study runs, as data: the settings (table row groups) and the methods (rows)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One row group of the paper's tables: a weight budget and an activation bit-width."""

    name: str
    weight_bits: float  # average weight bits (uniform when an integer)
    act_bits: int  # 8 or 16


@dataclass(frozen=True, kw_only=True)
class Method:
    """One row: how weights get their bits, which activation layers stay float, BOS handling.

    ``weights``: ``"uniform"`` (every layer at the budget; no row when it is not an integer),
    ``"sqnr_only"`` (one integer program over all layers with SQNR, as Yang et al.) or
    ``"mixdq"`` (metric-decoupled groups, Algorithm 1, the candidate with the lowest image
    MSE). ``acts``: ``"uniform"`` or ``"mixdq"`` (the top ``protect_fraction`` most sensitive
    layers of each group kept float). ``bos_aware``: MixDQ's BOS-aware text-embedding layers.
    """

    name: str
    title: str
    weights: str
    acts: str
    bos_aware: bool

    def __post_init__(self) -> None:
        if self.weights not in ("uniform", "sqnr_only", "mixdq"):
            raise ValueError(f"Method {self.name!r}: unknown weight allocation {self.weights!r}")
        if self.acts not in ("uniform", "mixdq"):
            raise ValueError(f"Method {self.name!r}: unknown activation policy {self.acts!r}")


DEFAULT_SETTINGS = (
    Setting(name="W8A8", weight_bits=8, act_bits=8),
    Setting(name="W5A8", weight_bits=5, act_bits=8),
    Setting(name="W4A8", weight_bits=4, act_bits=8),
    Setting(name="W4A16", weight_bits=4, act_bits=16),
    Setting(name="W3.66A16", weight_bits=3.66, act_bits=16),
)

# The rows of the paper's Tables 1 and 3 that the testbed study reproduces.
METHODS = (
    Method(name="naive", title="naive PTQ", weights="uniform", acts="uniform", bos_aware=True),
    Method(
        name="sqnr_only", title="SQNR-only MP", weights="sqnr_only", acts="uniform", bos_aware=True
    ),
    Method(
        name="mixdq_no_bos", title="MixDQ w/o BOS", weights="mixdq", acts="mixdq", bos_aware=False
    ),
    Method(name="mixdq", title="MixDQ", weights="mixdq", acts="mixdq", bos_aware=True),
)


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """What the study runs. Defaults fit the testbed in minutes on a laptop CPU."""

    model: str = "testbed"
    run_dir: Path = Path("runs/demo")
    num_calib: int = 16
    num_eval: int = 64
    num_select: int = 8  # prompts used to pick among Pareto candidates (MSE vs float)
    steps: int = 1
    seed: int = 0
    settings: tuple[Setting, ...] = DEFAULT_SETTINGS
    methods: tuple[Method, ...] = METHODS
    protect_fraction: float = 0.01
    chunk: int = 16
