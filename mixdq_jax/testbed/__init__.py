"""The built-in testbed: a small trained text-to-image model with SDXL's structure.

Procedural captioned scenes (``data``), a judge that reads the attributes back (``judge``),
the model definition and training (``model``, ``train``), and its evaluation (``evaluate``).
"""

from __future__ import annotations

from pathlib import Path

TESTBED_PATH = Path(__file__).parent / "assets" / "testbed"


def testbed_path() -> Path:
    """The shipped testbed folder (diffusers layout), or a clear error if it is not built."""
    if not (TESTBED_PATH / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{TESTBED_PATH}: the testbed model is not built; run `mixdq testbed train`"
        )
    return TESTBED_PATH


def calibration_captions(n: int = 32, *, seed: int = 0) -> list[str]:
    """``n`` training-split captions: the testbed's calibration prompts (as the paper
    calibrates on training-distribution prompts)."""
    from mixdq_jax.testbed.data import sample_scenes  # noqa: PLC0415

    return list(sample_scenes(n, seed=seed + 7, split="train").captions)


__all__ = ["TESTBED_PATH", "calibration_captions", "testbed_path"]
