"""AutoencoderKL parity with diffusers 0.42.1 on a tiny random VAE, and the legacy key fix."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from flax import traverse_util

from mixdq_jax.models.vae import AutoencoderKL, VAEConfig, legacy_vae_keys, param_shapes
from tests.models.conftest import max_abs_rel, numpy_state, perturb_, run_once
from tests.reference_data import sdxl_turbo
from weights_convert import torch_to_flax

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=16,
)


@pytest.fixture(scope="module")
def tiny():
    ref = diffusers.AutoencoderKL(**TINY).eval()
    perturb_(ref, 3)
    model = AutoencoderKL(VAEConfig.from_dict(dict(ref.config)))
    params = torch_to_flax(numpy_state(ref), param_shapes(model), what="tiny VAE")
    return ref, model, {"params": params}


def test_encode_parity_non_square(tiny):
    ref, model, variables = tiny
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 16, 24)).astype(np.float32)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(x)).latent_dist
    mean, logvar = run_once(functools.partial(model.apply, method="encode"), variables, x)
    err_m, rel_m = max_abs_rel(np.asarray(mean), dist.mean.numpy())
    err_v, rel_v = max_abs_rel(np.asarray(logvar), dist.logvar.numpy())
    print(f"VAE encode: mean max abs err {err_m:.3e}, logvar {err_v:.3e}")
    assert mean.shape == (2, 4, 8, 12)
    assert max(rel_m, rel_v) <= 1e-4


def test_decode_parity_non_square(tiny):
    ref, model, variables = tiny
    z = np.random.default_rng(1).standard_normal((2, 4, 8, 12)).astype(np.float32)
    with torch.no_grad():
        expected = ref.decode(torch.from_numpy(z)).sample.numpy()
    out = run_once(functools.partial(model.apply, method="decode"), variables, z)
    err, rel = max_abs_rel(np.asarray(out), expected)
    print(f"VAE decode: max abs err {err:.3e}, relative {rel:.3e}")
    assert out.shape == (2, 3, 16, 24)
    assert rel <= 1e-4


def test_legacy_attention_keys_load(tiny):
    ref, model, _ = tiny
    state = numpy_state(ref)
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value")):
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        key = key.replace(".attentions.0.to_out.0.", ".attentions.0.proj_attn.")
        if ".attentions.0." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # stored as 1x1 conv, as old checkpoints do
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    fixed = legacy_vae_keys(legacy)
    assert set(fixed) == set(state)
    for key, value in state.items():
        np.testing.assert_array_equal(fixed[key], value)
    torch_to_flax(fixed, param_shapes(model), what="legacy VAE")


def test_sdxl_vae_config_builds():
    cfg = VAEConfig.from_json(sdxl_turbo("vae_config.json"))
    flat = traverse_util.flatten_dict(param_shapes(AutoencoderKL(cfg), height=16, width=16))
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 83_653_863
    assert ("decoder", "mid_block", "attentions.0", "to_q", "kernel") in flat


@pytest.mark.parametrize(
    ("key", "value"),
    [("down_block_types", ("AttnDownEncoderBlock2D",)), ("act_fn", "softsign"), ("bogus", 1)],
)
def test_bad_config_values_raise(key, value):
    config = {**json.loads(sdxl_turbo("vae_config.json").read_text()), key: value}
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_dict(config)
