"""Backend selection shared by the kernels: one rule, so every op behaves alike."""

from __future__ import annotations

import jax

BACKENDS = ("auto", "pallas", "xla", "reference")


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_backend(backend: str) -> str:
    """`auto` is the Pallas Triton kernel on GPU and the XLA fallback elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "pallas" if on_gpu() else "xla"
    return backend


def resolve_interpret(interpret: bool | None) -> bool:
    """Pallas runs compiled (Triton) on GPU and in interpret mode anywhere else."""
    return (not on_gpu()) if interpret is None else interpret
