"""BOPs ("Compute Opt.") and storage ("Storage Opt."): hand counts of layers of the full-size
SDXL-turbo UNet (shapes only), total MACs against torch's FLOP counter on a diffusers UNet, and
stored bytes against `mixdq bench memory`'s table."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from torch.utils.flop_counter import FlopCounterMode

from mixdq_jax.deploy.memory import memory_table, plan_for_spec
from mixdq_jax.evaluation import bops
from mixdq_jax.models.unet import UNet2DConditionModel, UNetConfig, param_shapes
from mixdq_jax.quant.qconfig import QuantSpec
from tests.reference_data import sdxl_turbo
from tests.tiny_models import sdxl_unet_config

# one sample, 512x512 images = 64x64 latents; levels at 64, 32, 16; 77 text tokens
HAND = {
    "conv_in": 64 * 64 * 320 * (3 * 3 * 4),
    "time_embedding.linear_1": 320 * 1280,
    "down_blocks.0.downsamplers.0.conv": 32 * 32 * 320 * (3 * 3 * 320),  # stride 2
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 32 * 32 * 640 * 640,
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 77 * 2048 * 640,
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": 32 * 32 * 640 * 5120,
    "up_blocks.0.resnets.0.conv_shortcut": 16 * 16 * 2560 * 1280,  # concatenated skip input
    "conv_out": 64 * 64 * 4 * (3 * 3 * 320),
}


@pytest.fixture(scope="module")
def sdxl():
    return UNetConfig.from_json(sdxl_turbo("unet_config.json"))


def test_full_size_sdxl_turbo_hand_counts(sdxl):
    macs = bops.layer_macs(sdxl, latent=64)
    assert len(macs) == 794
    for name, expected in HAND.items():
        assert macs[name] == expected, name
    total = sum(macs.values())
    w8a8 = bops.compute_cost(sdxl, 8, 8, latent=64)
    w4a8 = bops.compute_cost(sdxl, 4, 8, latent=64)
    assert w8a8["bops"] == 64 * total and w4a8["bops"] == 32 * total
    assert w8a8["float_bops"] == 256 * total
    assert (w8a8["compute_opt"], w4a8["compute_opt"]) == (4.0, 8.0)  # Table 1's 4x and 8x
    # weight-only rows run in FP16 after dequantization: Table 1's "1x"
    assert bops.compute_cost(sdxl, 4, 16, latent=64)["compute_opt"] == 1.0
    # mixed: two layers at W4A8, one protected (float activations), the rest float
    names = list(HAND)
    mixed = bops.compute_cost(sdxl, {names[2]: 4, names[3]: 4, names[4]: 8},
                              {names[2]: 8, names[3]: 8}, latent=64)  # fmt: skip
    expected = 256 * total - (256 - 32) * (HAND[names[2]] + HAND[names[3]])
    assert mixed["bops"] == expected


def test_total_macs_equal_torch_flop_counter():
    """Every Linear/Conv of a diffusers UNet, counted by torch (FLOPs = 2 MACs), at a
    non-square latent; attention products (sdpa) are not layers and are left out by both."""
    kwargs = sdxl_unet_config()
    config = UNetConfig.from_dict(kwargs)
    torch.manual_seed(0)
    unet = TorchUNet(**kwargs).eval()
    sample = torch.zeros(1, 4, 16, 24)
    ctx = torch.zeros(1, 77, 64)
    added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.zeros(1, 6)}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(sample, 1.0, ctx, added_cond_kwargs=added)
    ops = counter.get_flop_counts()["Global"]
    layer_flops = sum(v for op, v in ops.items()
                      if str(op).split(".")[1] in ("convolution", "addmm", "mm"))  # fmt: skip
    assert layer_flops > 0
    assert 2 * sum(bops.layer_macs(config, latent=(16, 24)).values()) == layer_flops


def test_storage_equals_bench_memory():
    config = UNetConfig.from_dict(
        sdxl_unet_config(layers_per_block=1, transformer_layers_per_block=(1, 1))
    )
    table = memory_table(config, peak=False)["configs"]
    for key, bits in (("w8a8", 8), ("w4a8", 4)):
        spec = QuantSpec(weight_bits=bits, act_bits=8, symmetric_weights=True)
        storage = bops.storage_cost(config, spec)
        assert storage["param_bytes"] == table[key]["param_bytes"]
        assert storage["fp16_bytes"] == table["fp16"]["param_bytes"]
        assert round(storage["storage_opt"], 3) == table[key]["ratio_vs_float"]
    # an exported model's plan (`mixdq export` metadata) counts the same bytes and bits
    fp16_params = param_shapes(UNet2DConditionModel(config=config, dtype=jnp.float16,
                                                    param_dtype=jnp.float16))  # fmt: skip
    plan, _ = plan_for_spec(config, spec, fp16_params)
    exported = bops.storage_cost(
        config, plan=plan, bos_dim=config.per_block("cross_attention_dim")[0]
    )
    assert exported["param_bytes"] == table["w4a8"]["param_bytes"]
    assert bops.plan_bits(config, plan) == bops.spec_bits(config, spec)
    assert bops.storage_cost(config, None)["storage_opt"] == 1.0
    assert bops.storage_cost(config, QuantSpec(weight_bits=8, fp8=True))["storage_opt"] is None
