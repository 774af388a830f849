"""Numbers that would load or render as silent garbage: integer tensors where float weights
belong and NaN/inf weights fail at load naming the file and tensor; a stage of ``mixdq
generate`` that produces NaN/inf is named instead of writing a black image."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.pipeline import NonFiniteError, check_finite
from tests.cli.conftest import failed, mixdq
from weights_convert import ConversionError, torch_to_flax
from weights_convert.safetensors_io import load_safetensors, save_safetensors

UNET = Path("unet") / "diffusion_pytorch_model.safetensors"
TEXT = Path("text_encoder") / "model.safetensors"


def _patch(path: Path, key: str, change) -> None:
    tensors = dict(load_safetensors(path, mmap=False))
    key = key if key in tensors else f"text_model.{key}"  # CLIP files keep the old prefix
    tensors[key] = change(np.array(tensors[key]))
    save_safetensors(path, tensors)


def _nan_at_one(a: np.ndarray) -> np.ndarray:
    a.reshape(-1)[1] = np.nan
    return a


@pytest.mark.parametrize(
    ("file", "key", "change", "names"),
    [
        (UNET, "conv_out.weight", _nan_at_one, ["non-finite", "index [0, 0, 0, 1]"]),
        (TEXT, "final_layer_norm.weight", lambda a: a.astype(np.int32), ["int32"]),
    ],
)
def test_bad_weights_fail_at_load_naming_file_and_tensor(
    tmp_path, model_copy, file, key, change, names
):
    _patch(model_copy / file, key, change)
    out = tmp_path / "images"
    proc = mixdq("generate", "--model", model_copy, "--prompt", "a red circle", "--out", out)
    failed(proc, 2, "mixdq generate: error:", key, str(model_copy / file), *names)
    assert not out.exists()


def test_a_stage_producing_inf_is_named_and_no_image_is_written(tmp_path, model_copy):
    """Finite but huge UNet weights (they pass the load check): the UNet overflows."""
    _patch(model_copy / UNET, "conv_out.weight", lambda a: np.full_like(a, 3e38))
    out = tmp_path / "images"
    proc = mixdq("generate", "--model", model_copy, "--prompt", "a red circle", "--out", out)
    failed(proc, 2, "0000.png", "a red circle", "the UNet produced", "non-finite")
    assert not (out / "0000.png").exists()


def test_check_finite_names_the_stage():
    check_finite(jnp.ones(3), "VAE decoder", "the decoded images")
    with pytest.raises(NonFiniteError, match="VAE decoder produced 1 non-finite") as info:
        check_finite(jnp.array([1.0, jnp.nan, 2.0]), "VAE decoder", "the decoded images")
    assert info.value.stage == "VAE decoder"


def test_a_weight_too_large_for_the_load_dtype_is_named():
    target = {"proj": {"bias": jnp.zeros(3, jnp.float16)}}
    state = {"proj.bias": np.array([1.0, 7e4, 2.0], np.float32)}  # > float16's 65504
    with pytest.raises(ConversionError, match="'proj.bias'.*too large for float16"):
        torch_to_flax(state, target, sources={"proj.bias": "w.safetensors"})
