"""The layer registry against the official MixDQ SDXL-turbo files (names, groups, sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel as TorchUNet

from mixdq_jax.cli import main
from mixdq_jax.quant.registry import layer_group, registry_from_unet_config
from tests.reference_data import official, sdxl_turbo


def _official(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    return {k.removeprefix("model."): v for k, v in data.items()}


@pytest.fixture(scope="module")
def sdxl_layers():
    return registry_from_unet_config(sdxl_turbo("unet_config.json"))


def test_cli_json_equals_official_names_and_groups(capsys):
    config = str(sdxl_turbo("unet_config.json"))
    assert main(["layers", "--unet-config", config, "--format", "json"]) == 0
    layers = json.loads(capsys.readouterr().out)
    names = [layer["name"] for layer in layers]
    sqnr = _official(official("sensitivity", "weight_sqnr.yaml"))
    assert len(names) == len(set(names)) == 794
    assert set(names) == set(sqnr)
    content = {k for k in _official(official("sensitivity", "weight_ssim.yaml"))}
    assert {layer["name"] for layer in layers if layer["group"] == "content"} == content
    # the official rule, applied literally to the official names
    assert content == {k for k in sqnr if "ff" in k or "attn2" in k}
    kinds = [layer["kind"] for layer in layers]
    assert kinds.count("linear") == 743 and kinds.count("conv") == 51


def test_sizes_equal_official_ratio_files(sdxl_layers):
    """Weight numel / conv_in numel and input numel / 320 at a 64x64 latent, as officially."""
    w_ratio = _official(official("tensor_ratio", "weight_ratio.yaml"))
    a_ratio = _official(official("tensor_ratio", "act_ratio.yaml"))
    for layer in sdxl_layers:
        assert layer.weight_params / 11520 == pytest.approx(w_ratio[layer.name], rel=1e-12)
        assert layer.input_size / 320 == pytest.approx(a_ratio[layer.name], rel=1e-12)


def test_shapes_and_split_points_match_diffusers(sdxl_layers):
    """Against diffusers' own module tree (built on the meta device: no memory)."""
    config = json.loads(sdxl_turbo("unet_config.json").read_text())
    with torch.device("meta"):
        ref = TorchUNet.from_config(config)
    modules = dict(ref.named_modules())
    for layer in sdxl_layers:
        weight = modules[layer.name].weight
        if layer.kind == "linear":
            assert tuple(weight.shape) == layer.weight_shape[::-1]
        else:
            assert tuple(weight.shape) == (
                layer.weight_shape[3],
                layer.weight_shape[2],
                *layer.weight_shape[:2],
            )
    splits = {layer.name: layer.split_channels for layer in sdxl_layers if layer.split_channels}
    # up block resnets concatenate [hidden, skip]; their in-channels minus the skip's channels
    for name, split in splits.items():
        i, j = int(name.split(".")[1]), int(name.split(".")[3])
        block = ref.up_blocks[i]
        skip = block.resnets[j].conv1.in_channels - split
        n = len(block.resnets)
        rev = list(config["block_out_channels"])[::-1]
        expected_skip = rev[min(i + 1, len(rev) - 1)] if j == n - 1 else rev[i]
        assert skip == expected_skip, name
    assert len(splits) == 9


def test_group_rule():
    assert layer_group("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == "content"
    assert layer_group("mid_block.attentions.0.transformer_blocks.3.ff.net.0.proj") == "content"
    assert layer_group("up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q") == "quality"
    assert layer_group("up_blocks.0.resnets.0.conv_shortcut") == "quality"
