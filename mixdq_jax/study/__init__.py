"""The MixDQ study as data: targets x methods (rows) run through the recipe of
`mixdq quantize`, evaluated by the testbed's judge, and a report (``mixdq demo`` /
``make demo`` on the testbed)."""

from mixdq_jax.study.config import ABLATION, DEFAULT_TARGETS, StudyConfig
from mixdq_jax.study.run import run_study

__all__ = ["ABLATION", "DEFAULT_TARGETS", "StudyConfig", "run_study"]
