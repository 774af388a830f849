"""Frechet distance and feature statistics against torchmetrics' FrechetInceptionDistance,
given the same (tiny, random) feature network: torchmetrics accepts any ``nn.Module``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from mixdq_jax.evaluation import fid
from tests.evaluation.torchmetrics_import import import_torchmetrics


class TinyFeatures(torch.nn.Module):
    """uint8 NCHW images -> 12-d features (a conv, a nonlinearity, a global pool)."""

    num_features = 12

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 12, 3, stride=2)

    def forward(self, x):
        return torch.tanh(self.conv(x.float() / 64.0)).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def net():
    return TinyFeatures().eval()


def _features(net, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()


def _images(seed: int, n: int, shift: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.integers(0, 200, (n, 16, 16, 3)) + shift, 0, 255).astype(np.uint8)


def _torchmetrics_fid(net, real: np.ndarray, fake: np.ndarray) -> float:
    import_torchmetrics()  # torchmetrics beside a torch-fidelity whose __init__ cannot import
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=copy.deepcopy(net))  # it may move the module
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(fake).permute(0, 3, 1, 2), real=False)
    return float(metric.compute())


def test_equals_torchmetrics(net):
    real, fake = _images(0, 60), _images(1, 50, shift=40)
    ours = fid.frechet_distance(fid.feature_stats(_features(net, real)),
                                fid.feature_stats(_features(net, fake)))  # fmt: skip
    ref = _torchmetrics_fid(net, real, fake)
    assert ref > 1e-3
    assert ours == pytest.approx(ref, rel=1e-4)


def test_batched_statistics_equal_one_pass(net):
    """Accumulating batch by batch gives the statistics of the whole set (numpy's cov)."""
    images = _images(2, 45)
    stats = fid.stats_of_batches(lambda x: _features(net, x),
                                 (images[i:i + 8] for i in range(0, 45, 8)))  # fmt: skip
    feats = _features(net, images)
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-14)
    assert stats.count == 45


def test_set_against_itself_is_zero(net):
    stats = fid.feature_stats(_features(net, _images(3, 40)))
    assert abs(fid.frechet_distance(stats, stats)) < 1e-8 * np.trace(stats.sigma)


def test_reference_stats_cached(tmp_path, net):
    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(6):  # non-square JPEG/PNG files of different sizes
        arr = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    calls = []

    def extract(images):
        calls.append(images.shape)
        return _features(net, images)

    kw = dict(size=(16, 16), weights_id="w", cache=tmp_path / "cache", batch=4, progress=False)
    first, record = fid.reference_stats(folder, extract, **kw)
    assert calls == [(4, 16, 16, 3), (2, 16, 16, 3)] and record["images"] == 6
    again, record = fid.reference_stats(folder, extract, **kw)
    assert len(calls) == 2 and "cached" in record
    np.testing.assert_array_equal(first.sigma, again.sigma)
    expected = np.stack([fid.load_reference_image(p, (16, 16)) for p in sorted(folder.iterdir())])
    np.testing.assert_allclose(first.mu, _features(net, expected).mean(0), rtol=1e-12)


def test_bad_reference_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="COCO val2014"):
        fid.list_images(tmp_path / "missing")
    with pytest.raises(ValueError, match="found 0 image"):
        fid.list_images(tmp_path)
