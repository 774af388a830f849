"""Helpers shared by the model parity tests: random torch weights -> numpy -> Flax params."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Add seeded noise to every parameter so no weight is trivially zero or one.

    diffusers zero-initialises some tensors (biases, LayerNorm/GroupNorm shifts) and sets norm
    scales to one; parity on such values would miss transposed or swapped layers.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            spread = max(float(p.std()) if p.numel() > 1 else 0.0, 0.05)
            p.add_(torch.randn(p.shape, generator=gen) * 0.5 * spread)


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def max_abs_rel(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |ours - ref|, that divided by max(1, max |ref|))."""
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))
    return err, err / max(1.0, float(np.max(np.abs(ref))))


# XLA's CPU backend spends most of a tiny model's test time optimising code that then runs
# once; level 0 compiles about twice as fast and computes the same functions.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_once(fn, *args, **kwargs):
    """jit-compile `fn` for these arguments with cheap XLA options and call it once."""
    import jax

    return jax.jit(fn).lower(*args, **kwargs).compile(_FAST_COMPILE)(*args, **kwargs)
