"""MPQ-Diff's network-orthogonality layer importance, as a per-layer score for the allocator.

MPQ-Diff (Maruzzelli et al.) allocates bits by layer importance measured with a "network
orthogonality metric" per sampling step, sampling the steps uniformly to save profiling. Only
its abstract is available here (``papers/mpq-diff-abstract.txt``), so the method is
**reconstructed** from the abstract and its predecessor OMPQ (Ma et al., AAAI 2023):

- *From OMPQ* (reconstructed, not checked against code): the orthogonality metric (ORM) of two
  layers is the linear CKA of their output features, computed from their Gram matrices over
  the calibration samples, ``CKA(K, L) = <HKH, HLH>_F / (||HKH||_F ||HLH||_F)`` with
  ``K = X X^T`` and ``H`` the centring matrix (``centered=False`` drops ``H``). A layer whose
  output is weakly correlated with every other layer's (summed ORM low, i.e. nearly
  orthogonal) carries information no other layer does and is important: importance is a
  monotonically decreasing function of the summed ORM; we use
  ``theta_i = exp(-beta * mean_{j != i} ORM_ij)`` (the mean is the sum over ``L - 1``, so
  ``beta`` does not depend on the layer count). OMPQ then solves a linear program maximising
  ``sum_i theta_i b_i`` under a size budget: the scores here are ``theta_i * b`` per candidate
  bit-width, so the MixDQ allocator (which maximises summed scores) solves that program.
- *From the MPQ-Diff abstract*: ORM is taken per sampling step, with the steps sampled
  uniformly (here: ``num_timesteps`` evenly spaced steps of the calibration trajectory; all of
  them if fewer), and the per-step importances are averaged into one score per layer because
  our configurations hold one bit-width per layer for the whole trajectory.
- *Our choices* (not from either paper): features are the Dense/Conv outputs of the float UNet
  on the calibration run's stored float inputs of that step (each UNet-batch row a sample);
  a layer whose output is the same for every sample at a step (e.g. the time embedding) has
  an all-zero centred Gram and no defined CKA; it gets that step's median importance and is
  listed in ``Orthogonality.degenerate``. Weights and activations share the score (ORM is a
  property of the layer).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.official_format import SENSITIVITY_BITS
from mixdq_jax.pipeline import Pipeline
from mixdq_jax.quant.forward import forward
from mixdq_jax.quant.modes import CollectFeatures
from mixdq_jax.quant.qconfig import QUANT_BITS
from mixdq_jax.quant.registry import unet_layers
from mixdq_jax.sensitivity.calibration import CalibData, load_calibration
from mixdq_jax.sensitivity.config import KINDS, Scores
from mixdq_jax.sensitivity.sweep import write_scores

METRIC = "orthogonality"
_DEGENERATE = 1e-5  # ||centred Gram|| below this fraction of ||Gram||: no sample variation


@dataclass(frozen=True, kw_only=True)
class OrthogonalityConfig:
    """``num_timesteps`` sampled steps; ``beta`` of ``exp(-beta * mean ORM)``; ``max_rows``
    caps the samples (UNet-batch rows) per step; ``centered`` chooses linear CKA (True) or the
    uncentred Gram similarity."""

    bits: tuple[int, ...] = SENSITIVITY_BITS
    num_timesteps: int = 4
    beta: float = 1.0
    max_rows: int | None = None
    centered: bool = True

    def __post_init__(self) -> None:
        bits = tuple(int(b) for b in self.bits)
        object.__setattr__(self, "bits", bits)
        if not bits or any(b not in QUANT_BITS for b in bits):
            raise ValueError(f"OrthogonalityConfig: bits must be in {list(QUANT_BITS)}: {bits}")
        if self.num_timesteps < 1:
            raise ValueError("OrthogonalityConfig: num_timesteps must be >= 1")
        if not np.isfinite(self.beta) or self.beta <= 0:
            raise ValueError(f"OrthogonalityConfig: beta must be > 0, got {self.beta}")


@dataclass(frozen=True, kw_only=True)
class Orthogonality:
    """ORM matrices per sampled step, the per-layer importance and the allocator scores."""

    names: tuple[str, ...]
    steps: tuple[int, ...]  # indices into the calibration trajectory
    orm: np.ndarray  # [T, L, L]
    importance: np.ndarray  # [L], averaged over the steps
    degenerate: tuple[str, ...]  # layers with no sample variation at some step
    scores: Scores  # {layer: theta * b for b in bits}


# --------------------------------------------------------------------------- the math
def gram(features: np.ndarray | jax.Array) -> jax.Array:
    """``X X^T`` of per-sample features ``[N, ...]`` (flattened), in float32."""
    x = jnp.asarray(features, jnp.float32).reshape(features.shape[0], -1)
    return jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)


def center_gram(k: np.ndarray) -> np.ndarray:
    """``H K H`` with ``H = I - 11^T / n`` (the Gram of the centred features)."""
    k = np.asarray(k, np.float64)
    k = k - k.mean(axis=-1, keepdims=True)
    return k - k.mean(axis=-2, keepdims=True)


def linear_cka(gram_x: np.ndarray, gram_y: np.ndarray, *, centered: bool = True) -> float:
    """Linear CKA of two layers from their Gram matrices over the same samples."""
    kx, ky = np.asarray(gram_x, np.float64), np.asarray(gram_y, np.float64)
    if centered:
        kx, ky = center_gram(kx), center_gram(ky)
    return float(np.sum(kx * ky) / np.sqrt(np.sum(kx * kx) * np.sum(ky * ky)))


def orm_matrix(grams: np.ndarray, *, centered: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise ORM ``[L, L]`` of ``[L, N, N]`` Gram matrices, and a mask of degenerate layers
    (no sample variation) whose rows/columns are NaN."""
    k = np.asarray(grams, np.float64)
    raw = np.sqrt(np.sum(k * k, axis=(1, 2)))
    if centered:
        k = center_gram(k)
    v = k.reshape(k.shape[0], -1)
    norm = np.linalg.norm(v, axis=1)
    degenerate = norm <= _DEGENERATE * np.maximum(raw, np.finfo(np.float64).tiny)
    v = v / np.where(degenerate, 1.0, norm)[:, None]
    orm = v @ v.T
    orm[degenerate, :] = np.nan
    orm[:, degenerate] = np.nan
    return orm, degenerate


def importance(orm: np.ndarray, degenerate: np.ndarray, *, beta: float = 1.0) -> np.ndarray:
    """``exp(-beta * mean_{j != i} ORM_ij)`` over the non-degenerate layers; degenerate layers
    get the median of the others."""
    ok = ~degenerate
    n_ok = int(ok.sum())
    if n_ok < 2:
        raise ValueError("orthogonality: fewer than two layers vary across the samples")
    sub = orm[np.ix_(ok, ok)]
    mean = (sub.sum(axis=1) - np.diag(sub)) / (n_ok - 1)
    theta = np.empty(orm.shape[0])
    theta[ok] = np.exp(-beta * mean)
    theta[~ok] = np.median(theta[ok])
    return theta


def sample_steps(num_steps: int, k: int) -> tuple[int, ...]:
    """``k`` evenly spaced (uniform) step indices of a ``num_steps`` trajectory."""
    if k >= num_steps:
        return tuple(range(num_steps))
    return tuple(int(i) for i in np.unique(np.round(np.linspace(0, num_steps - 1, k))))


# --------------------------------------------------------------------------- features
def _gram_program(pipe: Pipeline, names: frozenset[str]):
    """A jitted UNet forward that returns ``{layer: Gram of its float output}``."""
    mode = CollectFeatures(names=names, feature=gram)

    def grams(params, sample, t, cond):
        return forward(pipe.unet, params, None, sample, t, cond, mode=mode)[1]

    return jax.jit(grams)


def layer_grams(
    pipe: Pipeline, run_dir: str | os.PathLike, step: int, *, max_rows: int | None = None
) -> dict[str, np.ndarray]:
    """``{layer: Gram [N, N]}`` of every quantizable layer's float output at ``step``."""
    return _grams(pipe, load_calibration(run_dir, pipe), step, max_rows)


def _grams(
    pipe: Pipeline, calib: CalibData, step: int, max_rows: int | None, program: Any = None
) -> dict[str, np.ndarray]:
    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    fn = program if program is not None else _gram_program(pipe, frozenset(names))
    inputs = np.concatenate([b.inputs[step] for b in calib.batches])
    context = np.concatenate([b.context for b in calib.batches])
    pooled = None
    if calib.batches[0].pooled is not None:
        pooled = np.concatenate([b.pooled for b in calib.batches])
    if max_rows is not None:
        inputs, context = inputs[:max_rows], context[:max_rows]
        pooled = None if pooled is None else pooled[:max_rows]
    cond = pipe.conditioning(context, pooled, calib.guidance, calib.height, calib.width)
    plan = pipe.scheduler.set_timesteps(calib.steps)
    t = jnp.asarray(plan.timesteps)[step]
    grams = fn(pipe.params["unet"], jnp.asarray(inputs), t, cond)
    return {n: np.asarray(grams[n]) for n in names}


# --------------------------------------------------------------------------- the metric
def orthogonality(
    pipe: Any,
    run_dir: str | os.PathLike,
    config: OrthogonalityConfig | None = None,
    *,
    kinds: Sequence[str] = KINDS,
) -> Orthogonality:
    """Importance of every UNet layer from network orthogonality on a calibrated run.

    Writes ``RUN/sensitivity/<kind>_orthogonality.yaml`` (official format, scores
    ``theta * b``; JSON for other bit sets, see ``write_scores``) for each of ``kinds``.
    """
    config = config or OrthogonalityConfig()
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"orthogonality: kinds must be among {KINDS}, got {list(kinds)}")
    calib = load_calibration(run_dir, pipe)
    steps = sample_steps(calib.steps, config.num_timesteps)
    names = tuple(layer.name for layer in unet_layers(pipe.unet.config))
    program = _gram_program(pipe, frozenset(names))
    orms, thetas, degenerate = [], [], set()
    for step in steps:
        grams = _grams(pipe, calib, step, config.max_rows, program)
        orm, deg = orm_matrix(np.stack([grams[n] for n in names]), centered=config.centered)
        orms.append(orm)
        thetas.append(importance(orm, deg, beta=config.beta))
        degenerate |= {n for n, d in zip(names, deg, strict=True) if d}
    theta = np.mean(thetas, axis=0)
    scores = {
        n: tuple(float(th * b) for b in config.bits) for n, th in zip(names, theta, strict=True)
    }
    for kind in kinds:
        write_scores(run_dir, kind, METRIC, scores, config.bits)
    return Orthogonality(
        names=names,
        steps=steps,
        orm=np.stack(orms),
        importance=theta,
        degenerate=tuple(n for n in names if n in degenerate),
        scores=scores,
    )


__all__ = [
    "METRIC",
    "Orthogonality",
    "OrthogonalityConfig",
    "center_gram",
    "gram",
    "importance",
    "layer_grams",
    "linear_cka",
    "orm_matrix",
    "orthogonality",
    "sample_steps",
]
