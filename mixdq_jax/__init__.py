"""mixdq-jax: MixDQ mixed-precision quantization of few-step diffusion models in JAX.

The public entries are :func:`load_pipeline` and :func:`qconfig_for` (`mixdq_jax.api`) and the
pure spine :func:`forward` (`mixdq_jax.quant`); allocation lives in `mixdq_jax.allocation`.
See ARCHITECTURE.md. Imports are lazy so the CLI starts fast.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

try:
    __version__ = importlib.metadata.version("mixdq-jax")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "Pipeline": "mixdq_jax.pipeline",
    "load_pipeline": "mixdq_jax.api",
    "qconfig_for": "mixdq_jax.api",
    "forward": "mixdq_jax.quant",
    "QuantSpec": "mixdq_jax.quant",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mixdq_jax' has no attribute {name!r}")
