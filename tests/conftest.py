"""Session-wide test settings."""

from __future__ import annotations

import os
import shutil
import tempfile

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


_JAX_CACHE: list[str] = []


def pytest_configure(config):
    """A persistent JAX compilation cache for this test process (one per xdist worker), set
    before collection: JAX decides whether to use the cache at its first compile.

    Why: in-process tests build fresh pipelines and run ``main([...])`` again and again (a
    resumed run, a second command), and each fresh object compiles the same programs again;
    with the cache a repeat loads the executable instead. Compile counts are unaffected
    (``_cache_size`` counts traces; JAX's compile event wraps a cache load too)."""
    import jax  # noqa: PLC0415

    folder = tempfile.mkdtemp(prefix="mixdq-test-jax-cache-")
    _JAX_CACHE.append(folder)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
    for folder in _JAX_CACHE:
        shutil.rmtree(folder, ignore_errors=True)
