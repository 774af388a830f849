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

import numpy as np
import pytest

from mixdq_jax.api import qconfig_for
from mixdq_jax.deploy import deploy_pipeline
from mixdq_jax.quant import QuantSpec
from mixdq_jax.quant.registry import unet_layers
from tests.deploy.conftest import PROMPTS, denoised


def _images(pipe, base, seed=3, qconfig=None):
    """Images of ``pipe``'s UNet (under ``qconfig``): shared text encoding and VAE decoding
    from ``base``."""
    return np.asarray(base.decode(denoised(pipe, base, PROMPTS, seed, qconfig)))


@pytest.fixture(scope="module")
def float_images(pipe):
    return _images(pipe, pipe)


def test_weight_only_mixed_bits_agree_to_float_rounding(pipe):
    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    rng = np.random.default_rng(1)
    spec = QuantSpec(weight_bits={n: int(rng.choice([2, 3, 4, 8])) for n in names}, act_bits=16)
    fake = _images(pipe, pipe, qconfig=qconfig_for(pipe, spec))
    real = _images(deploy_pipeline(pipe, spec), pipe)
    diff = float(np.abs(fake - real).max())
    print(f"weight-only mixed W2/3/4/8 A16: max |fake - real| = {diff:.2e}")
    assert diff < 1e-4


def test_w8a8_real_path_tracks_fake_quant(pipe, ranges, float_images):
    spec = QuantSpec(weight_bits=8, act_bits=8)
    fake = _images(pipe, pipe, qconfig=qconfig_for(pipe, spec, ranges))
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


def _codes(x, q):
    """The 8-bit activation codes both paths compute for ``x`` (f32 ``round(x / s) + zp``: an
    f64 recomputation would round some boundary values differently)."""
    from pallas_kernels import quantize_activation

    codes = quantize_activation(x, q["a_scale"], q["a_zp"], bits=8, backend="xla")
    return np.asarray(codes, np.int32)


def test_w8a8_divergence_starts_at_a_rounding_boundary(pipe, ranges):
    """The root cause of W8A8 fake-vs-real image differences, pinned layer by layer.

    In calling order, every quantized layer's input is compared between the fake and real
    forwards. Up to the first layer whose 8-bit codes differ, inputs agree to float rounding,
    so that first flip can only be a value sitting on a rounding boundary (a code off by
    exactly one). A real mismatch (range, zero point, BOS row, split) would instead show up as
    a layer input that differs beyond float rounding before any code has flipped.
    """
    from mixdq_jax.deploy.checkpoint import freeze
    from mixdq_jax.deploy.layers import Deployed
    from mixdq_jax.deploy.packed import node_at
    from mixdq_jax.quant import FakeQuant, intercept
    from tests.deploy.conftest import capture_layer_io, unet_inputs

    spec = QuantSpec(weight_bits=8, act_bits=8)
    plan, packed, _ = freeze(pipe, spec, ranges)
    qconfig = qconfig_for(pipe, spec, ranges)
    x, t, cond = unet_inputs(pipe, PROMPTS, seed=5)
    names = set(plan.layers)
    fake = capture_layer_io(pipe, pipe.params["unet"], x, t, cond, names,
                            inner=lambda: intercept(FakeQuant(), qconfig))  # fmt: skip
    deployed = Deployed(plan=plan, backend="xla")
    real = capture_layer_io(pipe, packed, x, t, cond, names,
                            inner=lambda: intercept(deployed))  # fmt: skip
    assert list(fake) == list(real) and set(fake) == names
    flipped = []
    for name, (_, xf, _) in fake.items():
        xr = real[name][1]
        p, lp = node_at(packed, name), plan.layers[name]
        flips = [
            _codes(xf[..., a:b], p[f"q{j}"]) - _codes(xr[..., a:b], p[f"q{j}"])
            for j, (a, b) in enumerate(lp.parts())
        ]
        xf, xr = np.asarray(xf, np.float64), np.asarray(xr, np.float64)
        if not flipped:
            # no code has differed yet: this input is the same up to float rounding
            rel = np.abs(xf - xr).max() / (np.abs(xf).max() + 1e-12)
            assert rel < 1e-5, f"{name}: input differs by {rel:.1e} before any flip"
        n = sum(int(np.count_nonzero(f)) for f in flips)
        if n:
            if not flipped:  # the first flip: one code step on a rounding boundary
                assert max(np.abs(f).max() for f in flips) == 1, name
            flipped.append((name, n))
    out_f, out_r = (np.asarray(list(d.values())[-1][2]) for d in (fake, real))
    diff = float(np.abs(out_f - out_r).max())
    print(f"W8A8 first code flips: {flipped[:3]} of {len(flipped)} layers; last layer {diff:.2e}")
    if not flipped:  # no boundary hit: the two paths must then agree to float rounding
        assert diff < 1e-5 * (1 + np.abs(out_f).max())
