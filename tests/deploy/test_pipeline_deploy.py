"""Fake-quant vs real low-bit pipelines end to end on the tiny SDXL pipeline.

Layer by layer the two paths agree to float rounding (`test_layers`). End to end, quantized
*activations* make the network discontinuous: a float-rounding difference that moves a value
across a rounding boundary flips one code, and flips cascade through later layers. The fake
path itself differs from itself by the same order when XLA merely compiles it differently
(measured: UNet output jit vs eager 0.065 at W8A8 on this tiny model). So:

- with float activations (weight-only quantization, no rounding boundary on activations) the
  images agree to float rounding;
- with 8-bit activations the real path's images deviate from the fake ones by less than the
  quantization error itself, and both paths' error from the float images are alike.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mixdq_jax.deploy import deploy_pipeline
from mixdq_jax.quant import QuantSpec, quantize_pipeline
from mixdq_jax.quant.quantize import unet_layers
from tests.deploy.conftest import PROMPTS, SIZE


def _images(pipe, base, seed=3):
    """Images of ``pipe``'s UNet: shared text encoding and VAE decoding from ``base``."""
    context, pooled = base.prompt_embeddings(PROMPTS, None, 0.0)
    latents = jax.random.normal(jax.random.key(seed), (len(PROMPTS), 4, SIZE // 2, SIZE // 2))
    out = pipe.denoise(
        latents,
        context,
        pooled,
        num_inference_steps=1,
        guidance_scale=0.0,
        height=SIZE,
        width=SIZE,
        noise_key=jax.random.key(seed + 1),
        qconfig=pipe.qconfig,
    )
    return np.asarray(base.decode(out))


@pytest.fixture(scope="module")
def float_images(pipe):
    return _images(pipe, pipe)


def test_weight_only_mixed_bits_agree_to_float_rounding(pipe):
    names = [layer.name for layer in unet_layers(pipe)]
    rng = np.random.default_rng(1)
    spec = QuantSpec(weight_bits={n: int(rng.choice([2, 3, 4, 8])) for n in names}, act_bits=16)
    fake = _images(quantize_pipeline(pipe, spec), pipe)
    real = _images(deploy_pipeline(pipe, spec), pipe)
    diff = float(np.abs(fake - real).max())
    print(f"weight-only mixed W2/3/4/8 A16: max |fake - real| = {diff:.2e}")
    assert diff < 1e-4


def test_w8a8_real_path_tracks_fake_quant(pipe, ranges, float_images):
    spec = QuantSpec(weight_bits=8, act_bits=8)
    fake = _images(quantize_pipeline(pipe, spec, calib=ranges), pipe)
    real = _images(deploy_pipeline(pipe, spec, ranges), pipe)
    fake_err = np.abs(fake - float_images)
    real_err = np.abs(real - float_images)
    diff = np.abs(fake - real)
    print(
        f"W8A8: max |fake - real| = {diff.max():.2e} (mean {diff.mean():.2e}); "
        f"quantization error max {fake_err.max():.2e} (mean {fake_err.mean():.2e})"
    )
    assert diff.mean() < fake_err.mean()
    assert 0.5 < real_err.mean() / fake_err.mean() < 2.0
