"""Component discovery: variants, shards, pickles, HF cache resolution, clear errors."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from weights_convert.checkpoint import (
    CheckpointError,
    load_component_weights,
    read_model_index,
    resolve_model_path,
)


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(3, 2, generator=g) for i in range(4)}


def test_single_file_and_fp16_variant(tmp_path):
    full, half = _tensors(0), {k: v.half() for k, v in _tensors(1).items()}
    safetensors.torch.save_file(full, tmp_path / "diffusion_pytorch_model.safetensors")
    safetensors.torch.save_file(half, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    got = load_component_weights(tmp_path)
    np.testing.assert_array_equal(got.state["layer0.weight"], full["layer0.weight"].numpy())
    got16 = load_component_weights(tmp_path, variant="fp16")
    assert got16.state["layer0.weight"].dtype == np.float16
    np.testing.assert_array_equal(got16.state["layer0.weight"], half["layer0.weight"].numpy())
    # a component without the asked variant reads the full-precision file, with a warning
    with pytest.warns(UserWarning, match="no 'bf16' variant"):
        got_bf16 = load_component_weights(tmp_path, variant="bf16")
    np.testing.assert_array_equal(got_bf16.state["layer0.weight"], full["layer0.weight"].numpy())


def test_missing_variant_without_full_precision_file_is_an_error(tmp_path):
    half = {k: v.half() for k, v in _tensors().items()}
    safetensors.torch.save_file(half, tmp_path / "model.fp16.safetensors")
    with pytest.raises(CheckpointError, match="no weights for variant 'bf16'"):
        load_component_weights(tmp_path, variant="bf16")


def test_only_fp16_present_is_used_without_variant(tmp_path):
    half = {k: v.half() for k, v in _tensors().items()}
    safetensors.torch.save_file(half, tmp_path / "model.fp16.safetensors")
    assert load_component_weights(tmp_path).state["layer1.weight"].dtype == np.float16


def test_sharded_index(tmp_path):
    t = _tensors()
    keys = sorted(t)
    safetensors.torch.save_file(
        {k: t[k] for k in keys[:2]}, tmp_path / "model-00001-of-00002.safetensors"
    )
    safetensors.torch.save_file(
        {k: t[k] for k in keys[2:]}, tmp_path / "model-00002-of-00002.safetensors"
    )
    weight_map = {k: f"model-0000{1 + i // 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = load_component_weights(tmp_path)
    assert set(got.state) == set(t)
    assert got.sources[keys[3]].endswith("model-00002-of-00002.safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard file 'model-00002-of-00002.safetensors'"):
        load_component_weights(tmp_path)


def test_pickle_refused_unless_allowed(tmp_path):
    torch.save(_tensors(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled PyTorch weights are refused"):
        load_component_weights(tmp_path)
    got = load_component_weights(tmp_path, allow_pickle=True)
    np.testing.assert_array_equal(got.state["layer2.weight"], _tensors()["layer2.weight"].numpy())


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="component folder is missing"):
        load_component_weights(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="no weights"):
        load_component_weights(tmp_path)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers pipeline folder"):
        read_model_index(tmp_path)


def test_repo_id_resolves_to_cached_snapshot(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--stabilityai--sdxl-turbo"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("stabilityai/sdxl-turbo") == snap
    with pytest.raises(CheckpointError, match="no cached snapshot of repo 'stabilityai/other'"):
        resolve_model_path("stabilityai/other")
