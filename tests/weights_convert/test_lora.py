"""LoRA fusion against PEFT's own merge on a tiny diffusers UNet."""

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from weights_convert.lora import LoRAError, fuse_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]


def _tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def _numpy_state(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _peft_reference(alpha: int, rank: int = 4):
    """(base state, LoRA tensors in PEFT naming, merged state from PEFT)."""
    unet = _tiny_unet()
    base = _numpy_state(unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora = {k: v.detach().numpy().copy() for k, v in get_peft_model_state_dict(unet).items()}
    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, BaseTunerLayer):
                m.merge()
    merged = {
        k.replace(".base_layer", ""): v.detach().numpy().copy()
        for k, v in unet.state_dict().items()
        if "lora_" not in k
    }
    return base, lora, merged


def test_peft_naming_matches_peft_merge():
    base, lora, merged = _peft_reference(alpha=4)
    lora = {f"unet.{k}": v for k, v in lora.items()}
    fused = fuse_lora({"unet": base}, lora)["unet"]
    assert set(fused) == set(merged)
    changed = 0
    for key, ref in merged.items():
        np.testing.assert_allclose(fused[key], ref, atol=1e-6, err_msg=key)
        changed += not np.array_equal(base[key], ref)
    assert changed >= 10  # the LoRA really touched many layers


def test_kohya_naming_with_alpha_matches_peft_merge():
    base, lora, merged = _peft_reference(alpha=8)
    kohya = {}
    for key, value in lora.items():
        stem, kind = key.split(".lora_")
        flat = "lora_unet_" + stem.replace(".", "_")
        kohya[f"{flat}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        kohya[f"{flat}.alpha"] = np.array(8.0, np.float32)
    fused = fuse_lora({"unet": base}, kohya)["unet"]
    for key, ref in merged.items():
        np.testing.assert_allclose(fused[key], ref, atol=1e-6, err_msg=key)


def test_scale_and_errors():
    base, lora, merged = _peft_reference(alpha=4)
    lora = {f"unet.{k}": v for k, v in lora.items()}
    half = fuse_lora({"unet": base}, lora, scale=0.5)["unet"]
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    np.testing.assert_allclose(half[key], (base[key] + merged[key]) / 2, atol=1e-6)
    bad = dict(lora)
    bad["unet.not_a_layer.lora_A.weight"] = np.zeros((4, 16), np.float32)
    bad["unet.not_a_layer.lora_B.weight"] = np.zeros((16, 4), np.float32)
    with pytest.raises(LoRAError, match="not_a_layer"):
        fuse_lora({"unet": base}, bad)
    lonely = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": np.zeros((4, 16))}
    with pytest.raises(LoRAError, match="lacks its up matrix"):
        fuse_lora({"unet": base}, lonely)
