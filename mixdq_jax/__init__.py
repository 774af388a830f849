"""mixdq-jax: MixDQ mixed-precision quantization of few-step diffusion models in JAX.

The public entry is :func:`load_pipeline`; quantization lives in :mod:`mixdq_jax.quant`,
allocation in :mod:`mixdq_jax.allocation`. Imports are lazy so the CLI starts fast.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Pipeline", "load_pipeline"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from mixdq_jax import pipeline  # noqa: PLC0415

        return getattr(pipeline, name)
    raise AttributeError(f"module 'mixdq_jax' has no attribute {name!r}")
