"""LPIPS (Zhang et al. 2018) between two image sets, in JAX, with the AlexNet backbone.

``d(a, b) = sum_l mean_hw( w_l . (f_l(a) / |f_l(a)| - f_l(b) / |f_l(b)|)^2 )``: ``f_l`` are the
five ReLU outputs of torchvision's ImageNet AlexNet, normalised to unit length over channels;
``w_l`` are the learned non-negative 1x1 weights of LPIPS v0.1. Images go in as uint8, are
mapped to [-1, 1] and then through LPIPS' ScalingLayer (``(x - shift) / scale``).

AlexNet, not VGG: it is the default of the ``lpips`` package (its authors' "best forward
scores" as a metric) and of torchmetrics' ``LearnedPerceptualImagePatchSimilarity``, which is
what SVDQuant/DeepCompressor's evaluation calls (``normalize=True``, default net), so LPIPS
numbers in the quantized-diffusion literature are AlexNet LPIPS.

``path`` is a folder holding two files (the ``.safetensors`` form of each, with the same
tensor names, is read without torch; the ``.pth`` form needs torch: ``pip install -e ".[eval]"``):

- ``alexnet-owt-7be5be79.pth`` (any ``alexnet*.pth`` or ``alexnet*.safetensors``): torchvision's
  ImageNet AlexNet weights (``AlexNet_Weights.IMAGENET1K_V1``), from
  https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (also in
  ``~/.cache/torch/hub/checkpoints/`` of anyone who has used it); ``features.*`` are read,
  the classifier is ignored;
- ``alex.pth`` (or ``alex.safetensors``): the LPIPS v0.1 linear layers ``lin{0..4}.model.1.weight``,
  from ``lpips/weights/v0.1/alex.pth`` of github.com/richzhang/PerceptualSimilarity (the same
  file ships inside the ``lpips`` package and as ``torchmetrics/functional/image/lpips_models/
  alex.pth``).
"""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.evaluation.errors import MissingWeightsError
from mixdq_jax.evaluation.weights_file import read_state_dict
from weights_convert.convert import torch_to_flax

METRIC = "LPIPS"
EXPECTED = (
    "a folder with torchvision's AlexNet weights (alexnet-owt-7be5be79.pth, or alexnet*.pth / "
    "alexnet*.safetensors) and the LPIPS v0.1 linear weights (alex.pth or alex.safetensors)"
)
SOURCE = (
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (torchvision) and "
    "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth "
    "(also inside the `lpips` and `torchmetrics` packages: "
    "torchmetrics/functional/image/lpips_models/alex.pth)"
)
# (out channels, kernel, stride, padding, max-pool before it) of AlexNet's five convs, keyed by
# their index in torchvision's ``features`` Sequential.
_CONVS = {
    0: (64, 11, 4, 2, False),
    3: (192, 5, 1, 2, True),
    6: (384, 3, 1, 1, True),
    8: (256, 3, 1, 1, False),
    10: (256, 3, 1, 1, False),
}
# LPIPS' ScalingLayer: the [-1, 1] image's ImageNet statistics.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_EPS = 1e-8  # inside the square root of the channel norm, as torchmetrics computes it


class AlexNetFeatures(nn.Module):
    """torchvision ``alexnet().features`` up to its last ReLU: the five ReLU outputs (NHWC)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        outs = []
        for index, (features, k, s, p, pool) in _CONVS.items():
            if pool:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            conv = nn.Conv(features, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                           name=f"features.{index}")  # fmt: skip
            x = jax.nn.relu(conv(x))
            outs.append(x)
        return tuple(outs)


class LPIPSNet(nn.Module):
    """uint8 image pairs ``[B, H, W, 3]`` -> LPIPS distance ``[B]``."""

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        # One backbone call on both sets (twice the batch), then the per-layer comparison.
        feats = AlexNetFeatures(name="net")(_scaled(jnp.concatenate([a, b])))
        total = 0.0
        for i, f in enumerate(feats):
            fa, fb = jnp.split(f, 2)
            diff = (_unit(fa) - _unit(fb)) ** 2
            # ``lin{i}.model.1``: index 1 of the (dropout, conv) Sequential in the lpips file
            w = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{i}.model.1")
            total = total + jnp.mean(w(diff), axis=(1, 2, 3))
        return total


def _scaled(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32) / 255.0
    x = 2 * x - 1
    return (x - jnp.asarray(_SHIFT, jnp.float32)) / jnp.asarray(_SCALE, jnp.float32)


def _unit(f: jax.Array) -> jax.Array:
    return f / jnp.sqrt(_EPS + jnp.sum(f * f, axis=-1, keepdims=True))


class LPIPS:
    """A loaded LPIPS network: ``distance(images_a, images_b)`` per image pair."""

    def __init__(self, params: dict):
        self.params = params
        self._apply = jax.jit(lambda p, a, b: LPIPSNet().apply({"params": p}, a, b))

    def distance(
        self, images_a: np.ndarray, images_b: np.ndarray, *, batch_size: int = 16
    ) -> np.ndarray:
        """LPIPS of each pair, ``float64 [N]``; ``images_*`` are uint8 ``[N, H, W, 3]``."""
        a, b = np.asarray(images_a), np.asarray(images_b)
        for x in (a, b):
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"images must be uint8 [N, H, W, 3], got {x.dtype} {x.shape}")
        if a.shape != b.shape:
            raise ValueError(f"LPIPS compares equal-shape sets, got {a.shape} and {b.shape}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rows, out = min(batch_size, len(a)), []
        for lo in range(0, len(a), batch_size):
            xa, xb = a[lo : lo + batch_size], b[lo : lo + batch_size]
            n = len(xa)
            if n < rows:  # pad the last batch: one shape, one compile
                pad = np.zeros((rows - n,) + a.shape[1:], np.uint8)
                xa, xb = np.concatenate([xa, pad]), np.concatenate([xb, pad])
            out.append(np.asarray(self._apply(self.params, xa, xb))[:n])
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def _find(folder: Path, patterns: tuple[str, ...]) -> Path | None:
    for pattern in patterns:
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def load_lpips(path: str | Path | None) -> LPIPS:
    """LPIPS (AlexNet, v0.1) from a folder with the two weight files (see the module doc)."""
    return LPIPS(_params(path, jnp.asarray))


def check_lpips(path: str | Path | None) -> None:
    """Read and check both weight files (every tensor the network needs, its shape and
    values) without keeping them: `mixdq evaluate` calls it before generating any image."""
    _params(path, _discard)


def _discard(_value: np.ndarray) -> None:
    return None


def _params(path: str | Path | None, to_leaf) -> dict:
    """The network's params from the folder's two files, each tensor through ``to_leaf``."""
    if path is None:
        raise MissingWeightsError(METRIC, None, expected=EXPECTED, source=SOURCE)
    folder = Path(path).expanduser()
    backbone = _find(folder, ("alexnet*.safetensors", "alexnet*.pth")) if folder.is_dir() else None
    linear = _find(folder, ("alex.safetensors", "alex.pth")) if folder.is_dir() else None
    if backbone is None or linear is None:
        raise MissingWeightsError(METRIC, folder, expected=EXPECTED, source=SOURCE)
    state, sources = {}, {}
    for file, prefix, keep in ((backbone, "net.", "features."), (linear, "", "lin")):
        for key, value in read_state_dict(file).items():
            if key.startswith(keep):
                state[prefix + key] = value
                sources[prefix + key] = str(file)
    target = jax.eval_shape(
        lambda: LPIPSNet().init(
            jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8),
            jnp.zeros((1, 64, 64, 3), jnp.uint8),
        )
    )["params"]  # fmt: skip
    return torch_to_flax(
        state, target, sources=sources, what="LPIPS", dtype=np.float32, to_leaf=to_leaf
    )
