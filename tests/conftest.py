"""Session-wide test settings."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _compile_record(tmp_path_factory):
    """The ``mixdq`` command's compile-time record (`mixdq_jax.cli.compile_notice`) goes to a
    temporary folder, not the user's cache (commands run in-process and as subprocesses)."""
    old = os.environ.get("MIXDQ_CACHE_DIR")
    os.environ["MIXDQ_CACHE_DIR"] = str(tmp_path_factory.mktemp("mixdq-cache"))
    yield
    if old is None:
        os.environ.pop("MIXDQ_CACHE_DIR", None)
    else:
        os.environ["MIXDQ_CACHE_DIR"] = old
