"""The FID Inception-v3 in JAX: the TF "2015-12-05" graph as torch-fidelity and pytorch-fid run it.

FID numbers are only comparable when computed with this exact network, the one torchmetrics'
``FrechetInceptionDistance`` calls through torch-fidelity: uint8 images resized to 299x299 with
TensorFlow 1.x bilinear resizing (``align_corners=False``: source = destination x in/out, no
half-pixel shift), scaled by ``(x - 128) / 128``, then Inception-v3 with the TF graph's quirks
(average pools that ignore padding, a max pool in the last block, 1008 classes) and the
2048-d average-pooled features. We port it rather than calling torch so FID runs on the
accelerator JAX uses, batched and jitted; the tests compare it with torch-fidelity's module.

Weights: the user's ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity) or
``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid; same tensor names). Reading a ``.pth``
needs torch (``pip install -e ".[eval]"``); a ``.safetensors`` or ``.npz`` copy with the same
names needs nothing else.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mixdq_jax.evaluation.errors import MissingWeightsError
from mixdq_jax.evaluation.weights_file import read_state_dict

INPUT_SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3
WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_SOURCE = (
    "torch-fidelity's release (https://github.com/toshas/torch-fidelity/releases/download/"
    "v0.2.0/weights-inception-2015-12-05-6726825d.pth) or pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth; the same file torchmetrics' FID downloads"
)

# (name, in, out, (kh, kw), stride, (ph, pw)) for every BasicConv2d (conv without bias + BN).
_Conv = tuple[str, int, int, tuple[int, int], int, tuple[int, int]]


def _block_a(name: str, cin: int, pool: int) -> list[_Conv]:
    return [
        (f"{name}.branch1x1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{name}.branch5x5_1", cin, 48, (1, 1), 1, (0, 0)),
        (f"{name}.branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
        (f"{name}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        (f"{name}.branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
        (f"{name}.branch_pool", cin, pool, (1, 1), 1, (0, 0)),
    ]


def _block_b(name: str, cin: int) -> list[_Conv]:
    return [
        (f"{name}.branch3x3", cin, 384, (3, 3), 2, (0, 0)),
        (f"{name}.branch3x3dbl_1", cin, 64, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
        (f"{name}.branch3x3dbl_3", 96, 96, (3, 3), 2, (0, 0)),
    ]


def _block_c(name: str, cin: int, c7: int) -> list[_Conv]:
    return [
        (f"{name}.branch1x1", cin, 192, (1, 1), 1, (0, 0)),
        (f"{name}.branch7x7_1", cin, c7, (1, 1), 1, (0, 0)),
        (f"{name}.branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
        (f"{name}.branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
        (f"{name}.branch7x7dbl_1", cin, c7, (1, 1), 1, (0, 0)),
        (f"{name}.branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
        (f"{name}.branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
        (f"{name}.branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
        (f"{name}.branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
        (f"{name}.branch_pool", cin, 192, (1, 1), 1, (0, 0)),
    ]


def _block_d(name: str, cin: int) -> list[_Conv]:
    return [
        (f"{name}.branch3x3_1", cin, 192, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3_2", 192, 320, (3, 3), 2, (0, 0)),
        (f"{name}.branch7x7x3_1", cin, 192, (1, 1), 1, (0, 0)),
        (f"{name}.branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
        (f"{name}.branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
        (f"{name}.branch7x7x3_4", 192, 192, (3, 3), 2, (0, 0)),
    ]


def _block_e(name: str, cin: int) -> list[_Conv]:
    return [
        (f"{name}.branch1x1", cin, 320, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3_1", cin, 384, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
        (f"{name}.branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
        (f"{name}.branch3x3dbl_1", cin, 448, (1, 1), 1, (0, 0)),
        (f"{name}.branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
        (f"{name}.branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
        (f"{name}.branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
        (f"{name}.branch_pool", cin, 192, (1, 1), 1, (0, 0)),
    ]


STEM: list[_Conv] = [
    ("Conv2d_1a_3x3", 3, 32, (3, 3), 2, (0, 0)),
    ("Conv2d_2a_3x3", 32, 32, (3, 3), 1, (0, 0)),
    ("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
    ("Conv2d_3b_1x1", 64, 80, (1, 1), 1, (0, 0)),
    ("Conv2d_4a_3x3", 80, 192, (3, 3), 1, (0, 0)),
]
CONVS: list[_Conv] = [
    *STEM,
    *_block_a("Mixed_5b", 192, 32),
    *_block_a("Mixed_5c", 256, 64),
    *_block_a("Mixed_5d", 288, 64),
    *_block_b("Mixed_6a", 288),
    *_block_c("Mixed_6b", 768, 128),
    *_block_c("Mixed_6c", 768, 160),
    *_block_c("Mixed_6d", 768, 160),
    *_block_c("Mixed_6e", 768, 192),
    *_block_d("Mixed_7a", 768),
    *_block_e("Mixed_7b", 1280),
    *_block_e("Mixed_7c", 2048),
]
_BY_NAME = {c[0]: c for c in CONVS}


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and (PyTorch) shapes the weights file must hold for the 2048-d features
    (the classifier ``fc`` is not needed and is ignored)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, cin, cout, (kh, kw), _, _ in CONVS:
        out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            out[f"{name}.bn.{leaf}"] = (cout,)
    return out


# ------------------------------------------------------------------------------ weights
def _checked_tensors(path: str | os.PathLike | None) -> dict[str, np.ndarray]:
    """The weights file's tensors, every one the network needs present, of its shape and
    finite; otherwise a `MissingWeightsError` (or a ``ValueError`` for a file that does not
    parse) naming the file."""
    expected = f"the FID Inception-v3 weights ({WEIGHTS_NAME})"
    if path is None or not Path(path).is_file():
        raise MissingWeightsError("fid", path, expected=expected, source=WEIGHTS_SOURCE)
    path = Path(path)
    tensors = read_state_dict(path)
    shapes = state_dict_shapes()
    missing = [k for k in shapes if k not in tensors]
    wrong = [k for k in shapes if k in tensors and tuple(tensors[k].shape) != shapes[k]]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"wrong shape {wrong[:3]}"
        raise MissingWeightsError(
            "fid", path, expected=f"{expected}; this file has {detail}", source=WEIGHTS_SOURCE
        )
    bad = [k for k in shapes if not np.all(np.isfinite(tensors[k]))]
    if bad:
        raise ValueError(f"{path}: non-finite values in {bad[:3]}; the file is damaged: fetch "
                         f"it again ({WEIGHTS_SOURCE})")  # fmt: skip
    return tensors


def check_inception(path: str | os.PathLike | None) -> None:
    """Read and check the weights file (every tensor, shape and value) without building the
    network: `mixdq evaluate` calls it before generating any image."""
    _checked_tensors(path)


def load_inception(path: str | os.PathLike | None) -> dict[str, jax.Array]:
    """The network's params (NHWC convs, BN as scale and shift) from the user's weights file;
    a missing file or one without the FID Inception's tensors is a `MissingWeightsError`."""
    tensors = _checked_tensors(path)
    params: dict[str, jax.Array] = {}
    for name, *_ in CONVS:
        w = np.asarray(tensors[f"{name}.conv.weight"], np.float32)
        params[f"{name}.w"] = jnp.asarray(w.transpose(2, 3, 1, 0))  # OIHW -> HWIO
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            params[f"{name}.{leaf}"] = jnp.asarray(tensors[f"{name}.bn.{leaf}"], jnp.float32)
    return params


# ------------------------------------------------------------------------------ network
@functools.cache
def _resize_table(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 bilinear (align_corners=False) sample points: lo, hi indices and the fraction, in
    float32 arithmetic as torch-fidelity computes them."""
    scale = np.float32(size_in / size_out)
    grid = np.arange(size_out, dtype=np.float32) * scale
    lo = grid.astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    return lo, hi, (grid - lo.astype(np.float32)).astype(np.float32)


def resize_tf1(x: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """``[N, H, W, C]`` float -> ``[N, size, size, C]``, interpolating along W, then H."""
    ylo, yhi, dy = _resize_table(x.shape[1], size)
    xlo, xhi, dx = _resize_table(x.shape[2], size)
    dx = jnp.asarray(dx)[None, None, :, None]
    dy = jnp.asarray(dy)[None, :, None, None]

    def along_w(rows):
        a, b = rows[:, :, xlo], rows[:, :, xhi]
        return a + (b - a) * dx

    top, bottom = along_w(x[:, ylo]), along_w(x[:, yhi])
    return top + (bottom - top) * dy


def _conv(p: Mapping[str, jax.Array], name: str, x: jax.Array) -> jax.Array:
    _, _, _, _, stride, (ph, pw) = _BY_NAME[name]
    y = jax.lax.conv_general_dilated(
        x, p[f"{name}.w"], (stride, stride), [(ph, ph), (pw, pw)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST,
    )  # fmt: skip
    inv = p[f"{name}.weight"] / jnp.sqrt(p[f"{name}.running_var"] + BN_EPS)
    y = (y - p[f"{name}.running_mean"]) * inv + p[f"{name}.bias"]
    return jax.nn.relu(y)


def _max_pool(x: jax.Array, stride: int, pad: int) -> jax.Array:
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 padding)  # fmt: skip


def _avg_pool_same(x: jax.Array) -> jax.Array:
    """3x3, stride 1, padding 1, padded zeros not counted (TF's average pool)."""
    padding = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, padding)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, padding)
    return total / count


def _a(p, n, x):
    b1 = _conv(p, f"{n}.branch1x1", x)
    b5 = _conv(p, f"{n}.branch5x5_2", _conv(p, f"{n}.branch5x5_1", x))
    b3 = _conv(p, f"{n}.branch3x3dbl_1", x)
    b3 = _conv(p, f"{n}.branch3x3dbl_3", _conv(p, f"{n}.branch3x3dbl_2", b3))
    bp = _conv(p, f"{n}.branch_pool", _avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


def _b(p, n, x):
    b3 = _conv(p, f"{n}.branch3x3", x)
    bd = _conv(p, f"{n}.branch3x3dbl_1", x)
    bd = _conv(p, f"{n}.branch3x3dbl_3", _conv(p, f"{n}.branch3x3dbl_2", bd))
    return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


def _c(p, n, x):
    b1 = _conv(p, f"{n}.branch1x1", x)
    b7 = x
    for k in (1, 2, 3):
        b7 = _conv(p, f"{n}.branch7x7_{k}", b7)
    bd = x
    for k in (1, 2, 3, 4, 5):
        bd = _conv(p, f"{n}.branch7x7dbl_{k}", bd)
    bp = _conv(p, f"{n}.branch_pool", _avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


def _d(p, n, x):
    b3 = _conv(p, f"{n}.branch3x3_2", _conv(p, f"{n}.branch3x3_1", x))
    b7 = x
    for k in (1, 2, 3, 4):
        b7 = _conv(p, f"{n}.branch7x7x3_{k}", b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


def _e(p, n, x, *, max_pool: bool):
    b1 = _conv(p, f"{n}.branch1x1", x)
    b3 = _conv(p, f"{n}.branch3x3_1", x)
    b3 = jnp.concatenate(
        [_conv(p, f"{n}.branch3x3_2a", b3), _conv(p, f"{n}.branch3x3_2b", b3)], axis=-1
    )
    bd = _conv(p, f"{n}.branch3x3dbl_2", _conv(p, f"{n}.branch3x3dbl_1", x))
    bd = jnp.concatenate(
        [_conv(p, f"{n}.branch3x3dbl_3a", bd), _conv(p, f"{n}.branch3x3dbl_3b", bd)], axis=-1
    )
    pooled = _max_pool(x, 1, 1) if max_pool else _avg_pool_same(x)  # the TF graph's quirk
    bp = _conv(p, f"{n}.branch_pool", pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def features(params: Mapping[str, jax.Array], images: jax.Array) -> jax.Array:
    """2048-d pool features of uint8 ``[N, H, W, 3]`` images (any size), float32."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"inception: expected [N, H, W, 3] images, got {images.shape}")
    x = resize_tf1(jnp.asarray(images, jnp.float32))
    x = (x - 128.0) / 128.0
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = _conv(params, name, x)
    x = _max_pool(x, 2, 0)
    x = _conv(params, "Conv2d_4a_3x3", _conv(params, "Conv2d_3b_1x1", x))
    x = _max_pool(x, 2, 0)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = _a(params, name, x)
    x = _b(params, "Mixed_6a", x)
    for name in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        x = _c(params, name, x)
    x = _d(params, "Mixed_7a", x)
    x = _e(params, "Mixed_7b", x, max_pool=False)
    x = _e(params, "Mixed_7c", x, max_pool=True)
    return jnp.mean(x, axis=(1, 2))


_features_jit = jax.jit(features)


def extract(params: Mapping[str, jax.Array], images: np.ndarray, *, batch: int = 32) -> np.ndarray:
    """Features of many uint8 images, in fixed-size batches (one compile; the last is padded)."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"inception: expected uint8 images, got {images.dtype}")
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        n = len(chunk)
        if n < batch and len(images) > batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        out.append(np.asarray(_features_jit(params, chunk))[:n])
    return np.concatenate(out) if out else np.zeros((0, FEATURES), np.float32)


def feature_extractor(path: str | os.PathLike | None) -> Any:
    """``images -> [N, 2048]`` with the user's weights (loaded once)."""
    params = load_inception(path)
    return functools.partial(extract, params)


__all__ = [
    "FEATURES",
    "INPUT_SIZE",
    "WEIGHTS_NAME",
    "check_inception",
    "extract",
    "feature_extractor",
    "features",
    "load_inception",
    "resize_tf1",
    "state_dict_shapes",
]
