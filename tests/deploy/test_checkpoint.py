"""Quantized checkpoints: export, reload and run identically; damaged files are clear errors;
``mixdq export`` on the command line."""

from __future__ import annotations

import argparse
import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax import api
from mixdq_jax.cli import export as export_cli
from mixdq_jax.deploy import (
    QuantCheckpointError,
    deploy_pipeline,
    export_quantized_pipeline,
    is_quantized_folder,
    load_quantized_pipeline,
    load_quantized_unet,
)
from mixdq_jax.deploy.checkpoint import read_noise_model, read_quant_meta
from mixdq_jax.deploy.layers import Deployed
from mixdq_jax.deploy.memory import stored_param_bytes
from mixdq_jax.quant import QuantSpec
from mixdq_jax.quant.registry import unet_layers
from tests.deploy.conftest import PROMPTS, denoised
from weights_convert.safetensors_io import load_safetensors, save_safetensors


def _latents(pipe, base):
    return np.asarray(denoised(pipe, base, PROMPTS[:2], seed=5))


@pytest.fixture(scope="module")
def spec(pipe):
    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    rng = np.random.default_rng(2)
    return QuantSpec(
        weight_bits={n: int(rng.choice([2, 4, 8])) for n in names},
        act_bits={n: int(rng.choice([8, 16])) for n in names},
    )


@pytest.fixture(scope="module")
def exported(pipe, ranges, spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "quantized"
    meta = export_quantized_pipeline(pipe, spec, out, calib=ranges, float_dtype=jnp.float32)
    return out, meta


def test_reloaded_checkpoint_runs_identically(pipe, ranges, spec, exported, pipe_dir):
    out, meta = exported
    assert is_quantized_folder(out) and not is_quantized_folder(pipe_dir)
    assert (out / "vae").is_dir() and (out / "tokenizer_2").is_dir()
    stored = load_safetensors(out / "unet" / meta["weights_file"])
    assert not any(k.endswith("/kernel") and "conv_in" in k for k in stored)  # no float copy
    float_bytes = sum(a.nbytes for a in jax.tree.leaves(pipe.params["unet"]))
    assert meta["param_bytes"] < 0.45 * float_bytes  # vs the f32 UNet (f32 norms/biases kept)
    # the size the study reports, traced from shapes only, is the exported arrays' size
    traced = stored_param_bytes(pipe.unet.config, spec, float_dtype=jnp.float32)
    assert traced == meta["param_bytes"]
    loaded = load_quantized_pipeline(out)
    memory = deploy_pipeline(pipe, spec, ranges)
    np.testing.assert_array_equal(_latents(loaded, pipe), _latents(memory, pipe))
    via_load_pipeline = api.load_pipeline(out)
    assert isinstance(via_load_pipeline.quantized.mode, Deployed)


def _copy(exported, tmp_path):
    src, _ = exported
    dst = tmp_path / "copy"
    shutil.copytree(src / "unet", dst / "unet")
    return dst / "unet"


def _patch_meta(unet, **changes):
    path = unet / "mixdq_quant.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))
    return meta


def test_truncated_file_is_a_clear_error(exported, tmp_path):
    unet = _copy(exported, tmp_path)
    weights = unet / "mixdq_unet.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(QuantCheckpointError, match="truncated"):
        load_quantized_unet(unet)


def test_foreign_file_is_a_clear_error(exported, tmp_path):
    unet = _copy(exported, tmp_path)
    weights = unet / "mixdq_unet.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    weights.write_bytes(bytes(data))
    with pytest.raises(QuantCheckpointError, match="checksum"):
        load_quantized_unet(unet)


def test_plan_and_tensors_must_match(exported, tmp_path):
    unet = _copy(exported, tmp_path)
    meta = json.loads((unet / "mixdq_quant.json").read_text())
    plan = meta["plan"]
    name = next(n for n, lp in plan.items() if lp["storage_bits"] == 8 and lp["w_bits"] < 16)
    plan[name] = {**plan[name], "w_bits": 4, "storage_bits": 4}
    _patch_meta(unet, plan=plan)
    with pytest.raises(QuantCheckpointError, match="the plan needs"):
        load_quantized_unet(unet, verify=False)
    # a tensor dropped from the file (and the size/checksum rewritten to match)
    unet = _copy(exported, tmp_path / "b")
    weights = unet / "mixdq_unet.safetensors"
    flat = dict(load_safetensors(weights, mmap=False))
    flat.pop(next(k for k in flat if k.endswith("/w_scale")))
    save_safetensors(weights, flat)
    import hashlib

    _patch_meta(
        unet,
        weights_bytes=weights.stat().st_size,
        weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
    )
    with pytest.raises(QuantCheckpointError, match="missing"):
        load_quantized_unet(unet)


def test_version_and_format_checks(exported, tmp_path):
    unet = _copy(exported, tmp_path)
    _patch_meta(unet, format_version=99)
    with pytest.raises(QuantCheckpointError, match="format version 99"):
        load_quantized_unet(unet)
    # a PTQD noise model comes only with the version that says the loop must apply it
    _patch_meta(unet, format_version=2)
    with pytest.raises(QuantCheckpointError, match="version 2 needs a 'noise_model'"):
        load_quantized_unet(unet)
    noise = {"timesteps": [999.0], "k": [0.1], "bias": [[0.0] * 4], "std": [0.1]}
    _patch_meta(unet, format_version=1, noise_model=noise)
    with pytest.raises(QuantCheckpointError, match="version 1 has no field 'noise_model'"):
        load_quantized_unet(unet)
    _patch_meta(unet, format_version=2, noise_model={**noise, "k": [0.1, 0.2]})
    with pytest.raises(QuantCheckpointError, match="mixdq_quant.json: noise_model: .*agree"):
        read_noise_model(unet, read_quant_meta(unet))
    with pytest.raises(ValueError, match="already quantized"):
        api.quantized_config(api.load_pipeline(exported[0]), QuantSpec(weight_bits=8))
    with pytest.raises(ValueError, match="already quantized"):
        export_quantized_pipeline(
            api.load_pipeline(exported[0]), QuantSpec(weight_bits=8), tmp_path / "again"
        )


def test_cli_export(pipe_dir, ranges, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "calib").mkdir(parents=True)
    buf = io.BytesIO()
    np.savez(buf, **ranges)
    (run / "calib" / "act_ranges.npz").write_bytes(buf.getvalue())
    parser = argparse.ArgumentParser()
    export_cli.register(parser.add_subparsers(dest="command"))
    out = tmp_path / "w4a8"
    args = parser.parse_args(
        [
            "export",
            "--model",
            str(pipe_dir),
            "--weight-bits",
            "4",
            "--act-bits",
            "8",
            "--symmetric-weights",
            "--calib",
            str(run),
            "--out",
            str(out),
            "--link-components",
        ]
    )
    assert args.func(args) == 0
    assert "exported W4A8 int" in capsys.readouterr().out
    plan, params, meta = load_quantized_unet(out / "unet")
    assert meta["float_dtype"] == "float16" and meta["spec"]["symmetric_weights"]
    assert {lp.storage_bits for lp in plan.layers.values()} == {4}
    assert (out / "vae").is_symlink()
    with pytest.raises(ValueError, match="nothing to quantize"):
        bad = parser.parse_args(["export", "--model", str(pipe_dir), "--out", str(out)])
        bad.func(bad)
    from mixdq_jax.cli import main  # noqa: PLC0415

    gen = ["generate", "--model", str(out), "--prompt", "a red circle", "--height", "32",
           "--width", "32", "--out", str(tmp_path / "imgs")]  # fmt: skip
    assert main(gen) == 0
    assert (tmp_path / "imgs" / "0000.png").is_file()
