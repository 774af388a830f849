"""The MixDQ study as data: settings x methods (rows), stages that cache in the run
directory, and a report (``mixdq demo`` / ``make demo`` on the testbed)."""

from mixdq_jax.study.config import DEFAULT_SETTINGS, METHODS, Method, Setting, StudyConfig
from mixdq_jax.study.run import run_study

__all__ = ["DEFAULT_SETTINGS", "METHODS", "Method", "Setting", "StudyConfig", "run_study"]
