"""EDA-DM's Temporal Distribution Alignment Calibration (TDAC): how many calibration samples
each sampling step gets (Liu et al. 2024, sec. "TDAC"; the public code's
``TDAC_*_calib_data_generator``).

The float UNet's feature map in the latent space (the input of the mid block's attention,
i.e. the output of ``mid_block.resnets.0``; :data:`FEATURE_MODULE`) is taken at every
sampling step ``t`` for the same few trajectories: ``F_t``. Two scores per step:

- density ``D_t = #{j != t : mean((F_t - F_j)^2) <= radius}``: how many other steps have
  feature maps close to this one (a step in a crowded part of the trajectory stands for many);
- variety ``V_t = sum_{j != t} mean(1 - cos(F_t, F_j))``, the cosine taken over channels at
  every (row, position) and averaged over them (the code sums; after the normalisation below
  a sum and a mean give the same score): how unlike the other steps this one is.

Each is min-max normalised over the steps, ``w_t = D_t + lam * V_t``, and the ``n``
calibration samples are split over the steps in proportion: ``n_t = round(n w_t / sum w)``,
the rounding error given back as the code does (a deficit: one more to the steps with the
most samples; a surplus: one less from the last steps that have any). Then every trajectory
(one row of one calibration batch) is used at exactly one step: the trajectories are
shuffled and the first ``n_0`` take step 0, the next ``n_1`` step 1, ... (the code's random
permutation of the step labels over the sample slots). So ``n`` is the number of
trajectories and the selection keeps one sample per trajectory.

Where a score is constant over the steps (its normalisation is 0/0) it is taken as 0; where
every weight is 0 the samples are split evenly. **One sampling step** (SDXL-turbo): both
scores are constant, every trajectory takes the only step, and the selection is every
sample: TDAC changes nothing and needs no features (:func:`select` does not ask for them).

Defaults are what the authors' released MS-COCO / Stable Diffusion run uses
(BienLuky/EDA-DM ``scripts/for_coco.sh`` l. 17, ``--lamda 5.0``; ``radius`` 0.3 is fixed in
``scripts/calibration.py`` l. 564, the weights at l. 583-585). That script's argument parser
defaults to ``lam`` 50 (``scripts/task_config.py`` l. 196), which the run script overrides;
`edadm-testbed` keeps 50, as the testbed's runs did. Other datasets' parsers use 0.5 to 100.
``radius`` is an absolute MSE of the feature maps, so it depends on the model's feature scale
(ours are the diffusers UNet's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mixdq_jax.reconstruction.loop import _take, float_targets

FEATURE_MODULE = "mid_block.resnets.0"
"""The latent-space feature map EDA-DM scores: the input of the mid block's attention."""


@dataclass(frozen=True, kw_only=True)
class CalibSelect:
    """TDAC settings: ``radius`` of the density count (feature MSE), ``lam`` the variety's
    weight, ``module`` whose output is the feature map, ``rows`` the trajectories whose
    feature maps are scored (the code scores its first sampling batch: 8 prompts for SD)."""

    radius: float = 0.3
    lam: float = 5.0
    module: str = FEATURE_MODULE
    rows: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.radius < 0.0 or self.lam < 0.0 or self.rows < 1:
            raise ValueError("CalibSelect: radius and lam must be >= 0, rows >= 1")


def _normalise(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return np.zeros_like(x) if span == 0 else (x - x.min()) / span


def density(features: np.ndarray, radius: float) -> np.ndarray:
    """``D_t``: the number of other steps whose feature maps are within ``radius`` (MSE)."""
    f = np.asarray(features, np.float64).reshape(np.shape(features)[0], -1)
    count = np.zeros(f.shape[0])
    for i in range(f.shape[0]):  # pairwise and direct: no cancellation near the radius
        for j in range(i + 1, f.shape[0]):
            if np.mean((f[i] - f[j]) ** 2) <= radius:
                count[i] += 1
                count[j] += 1
    return count


def variety(features: np.ndarray, *, channel_axis: int = -1, eps: float = 1e-6) -> np.ndarray:
    """``V_t``: the summed mean cosine distance (over channels) to every other step."""
    f = np.moveaxis(np.asarray(features, np.float64), channel_axis, -1)
    f = f.reshape(f.shape[0], -1, f.shape[-1])  # [steps, positions, channels]
    norm = np.linalg.norm(f, axis=-1)
    dots = np.einsum("spc,tpc->stp", f, f)
    cos = dots / np.maximum(norm[:, None] * norm[None, :], eps)
    dist = np.mean(1.0 - cos, axis=-1)
    np.fill_diagonal(dist, 0.0)
    return dist.sum(axis=1)


def step_weights(
    features: np.ndarray, *, radius: float, lam: float, channel_axis: int = -1
) -> np.ndarray:
    """``w_t = norm(D_t) + lam * norm(V_t)`` from feature maps ``[steps, rows, ...]``."""
    d = _normalise(density(features, radius))
    v = _normalise(variety(features, channel_axis=channel_axis))
    return d + lam * v


def step_counts(weights: np.ndarray, n: int) -> np.ndarray:
    """``n`` samples split over the steps in proportion to ``weights`` (sum exactly ``n``)."""
    w = np.asarray(weights, np.float64)
    if np.any(w < 0) or n < 0:
        raise ValueError("step_counts: weights and n must be >= 0")
    prob = np.full_like(w, 1.0 / w.size) if w.sum() == 0 else w / w.sum()
    counts = np.round(prob * n).astype(np.int64)
    error = n - int(counts.sum())
    if error > 0:  # one more to the steps with the most samples (earlier step on a tie)
        counts[np.argsort(-counts, kind="stable")[:error]] += 1
    while error < 0:  # one less from the last steps that have any
        for t in range(w.size - 1, -1, -1):
            if error < 0 and counts[t] > 0:
                counts[t] -= 1
                error += 1
    return counts


def assign(step_of: np.ndarray, trajectory_of: np.ndarray, counts: np.ndarray, seed: int = 0):
    """Sample indices (sorted): trajectories shuffled, the first ``counts[0]`` at step 0, ...
    ``step_of`` / ``trajectory_of``: each sample's step and trajectory."""
    step_of, trajectory_of = np.asarray(step_of), np.asarray(trajectory_of)
    trajectories = np.unique(trajectory_of)
    if int(np.sum(counts)) != trajectories.size:
        raise ValueError(f"assign: {int(np.sum(counts))} samples for {trajectories.size} "
                         "trajectories")  # fmt: skip
    order = np.random.default_rng(seed).permutation(trajectories)
    steps = np.repeat(np.arange(len(counts)), counts)
    where = {
        (int(s), int(r)): i for i, (s, r) in enumerate(zip(step_of, trajectory_of, strict=True))
    }
    missing = [(int(s), int(r)) for s, r in zip(steps, order, strict=True) if (s, r) not in where]
    if missing:
        raise ValueError(f"assign: no sample at (step, trajectory) {missing[:5]}")
    return np.sort([where[(int(s), int(r))] for s, r in zip(steps, order, strict=True)])


def select(
    step_of: np.ndarray,
    trajectory_of: np.ndarray,
    features: Callable[[np.ndarray], np.ndarray] | None,
    config: CalibSelect = CalibSelect(),
) -> np.ndarray:
    """TDAC's calibration samples: their indices (sorted) among ``step_of``/``trajectory_of``.

    ``features(indices)``: the feature maps ``[len(indices), ...]`` (channels last) of those
    samples, computed with the float UNet (`feature_fn`); asked only where there is more than
    one step, for the first ``config.rows`` trajectories at every step.
    """
    step_of, trajectory_of = np.asarray(step_of), np.asarray(trajectory_of)
    steps = np.unique(step_of)
    if not np.array_equal(steps, np.arange(steps.size)):
        raise ValueError(f"select: steps must be 0..S-1, got {steps.tolist()[:10]}")
    n = np.unique(trajectory_of).size
    if steps.size == 1:  # one step: every trajectory at it, i.e. every sample
        return np.arange(step_of.size)
    if features is None:
        raise ValueError("select: several sampling steps need the feature maps")
    rows = np.unique(trajectory_of)[: config.rows]
    idx = [np.flatnonzero((step_of == s) & np.isin(trajectory_of, rows)) for s in steps]
    if len({i.size for i in idx}) != 1:
        raise ValueError("select: the scored trajectories are not sampled at every step")
    feats = np.asarray(features(np.concatenate(idx)))
    feats = feats.reshape(steps.size, idx[0].size, *feats.shape[1:])
    weights = step_weights(feats, radius=config.radius, lam=config.lam)
    return assign(step_of, trajectory_of, step_counts(weights, n), config.seed)


def feature_fn(apply, params, data, module: str = FEATURE_MODULE, batch_size: int = 8):
    """``features(indices)`` for :func:`select`: the float model's ``module`` output on those
    samples of ``data`` (``apply`` / ``data`` as `loop.reconstruct` takes them)."""

    def features(indices: np.ndarray) -> np.ndarray:
        sub = _take(data, np.asarray(indices))
        return float_targets(apply, params, sub, [module], batch_size)[module]

    return features
