"""UNet2DConditionModel parity with diffusers 0.42.1 (tiny random models) and full-size shapes."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mixdq_jax.models.embeddings import get_timestep_embedding
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, param_shapes
from tests.models.conftest import max_abs_rel, numpy_state, perturb_, run_once
from tests.reference_data import official, sdxl_turbo
from weights_convert import torch_to_flax

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# SDXL layout in miniature: plain first block, per-block heads and transformer depths, linear
# projections, text_time added conditioning.
SDXL_TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 8),
    norm_num_groups=8,
    cross_attention_dim=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
    upcast_attention=True,
)

# SD1.5 layout in miniature (+ LCM's cond_proj): cross-attention first, plain last block,
# one int for heads, 1x1-conv projections; the other sinusoid convention.
SD15_TINY = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    norm_num_groups=16,
    cross_attention_dim=48,
    use_linear_projection=False,
    flip_sin_to_cos=False,
    freq_shift=1,
    time_cond_proj_dim=8,
)

# Less common options in one small model: per-layer transformer depths with an explicit reverse,
# per-block layers, a resnet-only mid block, asymmetric (padding 0) downsampling at odd sizes,
# other activations, kernel sizes and time-embedding options.
EXOTIC_TINY = dict(
    block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    layers_per_block=(1, 2),
    transformer_layers_per_block=((2,), (1, 1)),
    reverse_transformer_layers_per_block=((1, 1, 1), (1, 2)),
    attention_head_dim=(2, 4),
    norm_num_groups=4,
    norm_eps=1e-6,
    cross_attention_dim=24,
    downsample_padding=0,
    center_input_sample=True,
    mid_block_scale_factor=1.5,
    time_embedding_dim=40,
    time_embedding_act_fn="silu",
    timestep_post_act="mish",
    act_fn="gelu",
    conv_in_kernel=1,
    conv_out_kernel=5,
)


def _parity(
    config: dict, *, height: int, width: int, timesteps, seed: int, dtypes=(jnp.float32,)
) -> list[tuple[float, float]]:
    """(max abs err, relative err) of our UNet vs diffusers, per compute dtype."""
    ref = diffusers.UNet2DConditionModel(**config).eval()
    perturb_(ref, seed)
    cfg = UNetConfig.from_dict(dict(ref.config))

    rng = np.random.default_rng(seed)
    batch = 2
    sample = rng.standard_normal((batch, cfg.in_channels, height, width)).astype(np.float32)
    context = rng.standard_normal((batch, 7, config["cross_attention_dim"])).astype(np.float32)
    kwargs: dict = {}
    torch_kwargs: dict = {}
    if cfg.addition_embed_type == "text_time":
        text = rng.standard_normal((batch, 16)).astype(np.float32)
        time_ids = np.array([[512, 512, 0, 0, 512, 512], [1024, 768, 16, 48, 1024, 768]])
        time_ids = time_ids.astype(np.float32)
        kwargs["added_cond_kwargs"] = {"text_embeds": text, "time_ids": time_ids}
        torch_kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.from_numpy(text),
            "time_ids": torch.from_numpy(time_ids),
        }
    if cfg.time_cond_proj_dim is not None:
        cond = rng.standard_normal((batch, cfg.time_cond_proj_dim)).astype(np.float32)
        kwargs["timestep_cond"] = cond
        torch_kwargs["timestep_cond"] = torch.from_numpy(cond)

    with torch.no_grad():
        t_ref = torch.tensor(timesteps) if isinstance(timesteps, list) else timesteps
        expected = ref(
            torch.from_numpy(sample), t_ref, torch.from_numpy(context), **torch_kwargs
        ).sample.numpy()

    params = torch_to_flax(
        numpy_state(ref), param_shapes(UNet2DConditionModel(cfg)), what="tiny UNet"
    )
    errors = []
    for dtype in dtypes:
        model = UNet2DConditionModel(cfg, dtype=dtype)
        args = ({"params": params}, sample, jnp.asarray(timesteps), context)
        out = run_once(model.apply, *args, **kwargs)
        assert out.shape == expected.shape and out.dtype == dtype
        errors.append(max_abs_rel(np.asarray(out, np.float32), expected))
    return errors


def test_sdxl_style_parity():
    [(err, rel)] = _parity(SDXL_TINY, height=16, width=24, timesteps=[999, 250], seed=0)
    print(f"SDXL-style tiny UNet: max abs err {err:.3e}, relative {rel:.3e}")
    assert rel <= 1e-4


def test_sd15_style_parity_odd_size():
    # 18x22 is not divisible by 2**num_upsamplers: the up path takes explicit upsample sizes.
    [(err, rel)] = _parity(SD15_TINY, height=18, width=22, timesteps=799, seed=1)
    print(f"SD1.5-style tiny UNet: max abs err {err:.3e}, relative {rel:.3e}")
    assert rel <= 1e-4


def test_less_common_options_parity_and_bfloat16():
    (err, rel), (err16, rel16) = _parity(
        EXOTIC_TINY,
        height=10,
        width=13,
        timesteps=[3, 500],
        seed=2,
        dtypes=(jnp.float32, jnp.bfloat16),
    )
    print(f"less-common-options tiny UNet: max abs err {err:.3e}, relative {rel:.3e}")
    print(f"  bfloat16 compute vs float32 diffusers: max abs err {err16:.3e}, rel {rel16:.3e}")
    assert rel <= 1e-4
    assert rel16 <= 5e-2


@pytest.mark.parametrize(
    ("dim", "flip", "shift"), [(32, True, 0), (32, False, 1), (9, True, 1), (256, True, 0)]
)
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding as ref_embedding

    t = np.array([0, 1, 250, 499.5, 999, 1024], np.float32)
    expected = ref_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
    ours = get_timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    # Our frequencies are correctly rounded float32; torch's vectorised exp is off by one ulp for
    # a few of them, which at t ~ 1000 moves sin/cos by up to ~3e-5.
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-4)


@pytest.mark.slow
def test_sdxl_turbo_full_size_shapes_and_layer_names():
    model = UNet2DConditionModel(UNetConfig.from_json(sdxl_turbo("unet_config.json")))
    flat = traverse_util.flatten_dict(param_shapes(model))
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == 2_567_463_684
    dense = {".".join(k[:-1]) for k, v in flat.items() if k[-1] == "kernel" and len(v.shape) == 2}
    conv = {".".join(k[:-1]) for k, v in flat.items() if k[-1] == "kernel" and len(v.shape) == 4}
    assert (len(dense), len(conv)) == (743, 51)
    sqnr = official("sensitivity", "weight_sqnr.yaml").read_text()
    names = set(re.findall(r"^model\.(\S+):$", sqnr, flags=re.M))
    assert len(names) == 794
    assert dense | conv == names


BAD_VALUES = [
    ("resnet_time_scale_shift", "scale_shift"),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("only_cross_attention", True),
    ("dual_cross_attention", True),
    ("encoder_hid_dim_type", "text_proj"),
    ("addition_embed_type", "text"),
    ("time_embedding_type", "fourier"),
    ("attention_type", "gated"),
    ("cross_attention_norm", "layer_norm"),
    ("num_attention_heads", 4),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ("AttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
    ("up_block_types", ("UpBlock2D", "CrossAttnUpBlock2D", "KCrossAttnUpBlock2D")),
    ("act_fn", "softsign"),
    ("class_embeddings_concat", True),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_unsupported_config_values_raise(key, value):
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict({**SD15_TINY, key: value})


def test_unknown_key_and_bad_lengths_raise():
    with pytest.raises(ValueError, match="no_such_option"):
        UNetConfig.from_dict({**SD15_TINY, "no_such_option": 1})
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.from_dict({**SD15_TINY, "attention_head_dim": [2, 4]})
    with pytest.raises(ValueError, match="text_time"):
        UNetConfig.from_dict({**SDXL_TINY, "addition_time_embed_dim": None})
