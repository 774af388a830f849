"""Metrics against scikit-image and numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from mixdq_jax.metrics import mse, psnr, sqnr_db, ssim_global


def _pair(rng, shape, noise):
    x = rng.integers(0, 256, size=shape).astype(np.uint8)
    y = np.clip(x + rng.normal(0, noise, size=shape), 0, 255).astype(np.uint8)
    return x, y


@pytest.mark.parametrize("size", [7, 33, 65])
@pytest.mark.parametrize("sample_covariance", [True, False])
def test_global_ssim_matches_skimage_full_window(size, sample_covariance):
    # On an odd square image, skimage with win_size = the image size (uniform window) keeps one
    # window position after cropping its border: the whole image, i.e. the global SSIM.
    rng = np.random.default_rng(size)
    for noise in (5.0, 40.0):
        x, y = _pair(rng, (size, size, 3), noise)
        ref = structural_similarity(
            x,
            y,
            win_size=size,
            channel_axis=-1,
            data_range=255,
            gaussian_weights=False,
            use_sample_covariance=sample_covariance,
        )
        got = float(ssim_global(x, y, data_range=255.0, sample_covariance=sample_covariance))
        assert got == pytest.approx(ref, abs=2e-6), (noise, got, ref)
    # float images with data range 1 (as a pipeline would give them)
    xf, yf = x.astype(np.float32) / 255, y.astype(np.float32) / 255
    ref = structural_similarity(xf, yf, win_size=size, channel_axis=-1, data_range=1.0)
    assert float(ssim_global(xf, yf, data_range=1.0)) == pytest.approx(ref, abs=2e-6)


def np_global_ssim(x, y, data_range):  # the paper's formula, sample (co)variances
    x, y = x.astype(np.float64), y.astype(np.float64)
    out = []
    for c in range(x.shape[-1]):
        a, b = x[..., c].ravel(), y[..., c].ravel()
        cov = np.cov(a, b)  # N - 1 normalisation
        c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
        ma, mb = a.mean(), b.mean()
        out.append(
            ((2 * ma * mb + c1) * (2 * cov[0, 1] + c2))
            / ((ma**2 + mb**2 + c1) * (cov[0, 0] + cov[1, 1] + c2))
        )
    return float(np.mean(out))


def test_global_ssim_non_square_batched_and_vmapped():
    rng = np.random.default_rng(1)
    xs, ys = zip(*[_pair(rng, (24, 40, 3), 20.0) for _ in range(4)], strict=True)
    xs, ys = np.stack(xs), np.stack(ys)
    refs = [np_global_ssim(a, b, 255.0) for a, b in zip(xs, ys, strict=True)]
    np.testing.assert_allclose(ssim_global(xs, ys), refs, atol=2e-6)
    vm = jax.jit(jax.vmap(lambda a, b: ssim_global(a, b)))(xs, ys)
    np.testing.assert_allclose(vm, refs, atol=2e-6)
    assert float(ssim_global(xs[0], xs[0])) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes"):
        ssim_global(xs[0], ys[0, :, :20])


def test_mse_psnr_sqnr():
    rng = np.random.default_rng(2)
    x, y = _pair(rng, (17, 19, 3), 12.0)
    assert float(mse(x, y)) == pytest.approx(mean_squared_error(x, y), rel=1e-6)
    assert float(psnr(x, y, data_range=255.0)) == pytest.approx(
        peak_signal_noise_ratio(x, y, data_range=255), rel=1e-6
    )
    ref = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    test = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    r64, t64 = ref.astype(np.float64), test.astype(np.float64)
    expect = 10 * np.log10(np.sum(r64**2) / np.sum((t64 - r64) ** 2))
    assert float(sqnr_db(ref, test)) == pytest.approx(expect, abs=1e-4)
    per = sqnr_db(ref, test, axis=(1, 2, 3))
    expect = 10 * np.log10(np.sum(r64**2, (1, 2, 3)) / np.sum((t64 - r64) ** 2, (1, 2, 3)))
    np.testing.assert_allclose(per, expect, atol=1e-4)
    scaled = float(sqnr_db(jnp.asarray(ref), jnp.asarray(ref) * 1.001))
    assert scaled == pytest.approx(60.0, abs=1e-3)
