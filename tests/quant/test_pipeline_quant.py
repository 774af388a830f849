"""Fake-quantized pipelines: one compile for every configuration, calibration, CLI."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from mixdq_jax.api import load_pipeline, qconfig_for
from mixdq_jax.calibrate import CalibConfig, calibrate
from mixdq_jax.cli import main
from mixdq_jax.quant import QuantSpec
from mixdq_jax.quant.registry import unet_layers
from mixdq_jax.rundir import RunDir
from tests.tiny_models import SMALL_UNET, build_sdxl

PROMPTS = ["a red circle", "a blue square on a green background", "two yellow triangles"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("qsdxl") / "pipe", unet_overrides=SMALL_UNET)


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return load_pipeline(pipe_dir)


@pytest.fixture(scope="module")
def run_dir(pipe, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    config = CalibConfig(prompts=tuple(PROMPTS), height=32, width=32, batch_size=2)
    calibrate(pipe, config, run)
    return run


def test_float_spec_reproduces_float_pipeline(pipe):
    ref = pipe(PROMPTS[:2], height=32, width=32, seed=1)
    q = qconfig_for(pipe, QuantSpec(weight_bits=16, act_bits=16))
    np.testing.assert_array_equal(pipe(PROMPTS[:2], height=32, width=32, seed=1, qconfig=q), ref)


def test_three_configurations_compile_once(pipe, run_dir):
    ranges = RunDir(run_dir).act_ranges()
    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    rng = np.random.default_rng(0)
    context, pooled = pipe.prompt_embeddings(PROMPTS[:1], None, 0.0)
    latents = jax.random.normal(jax.random.key(0), (1, 4, 16, 16))
    quant = pipe.with_params()  # a fresh compile cache: count this test's compiles only
    outs = []
    for _ in range(3):
        spec = QuantSpec(
            weight_bits={n: int(rng.choice([2, 4, 8])) for n in names},
            act_bits={n: int(rng.choice([4, 8, 16])) for n in names},
        )
        qconfig = qconfig_for(pipe, spec, ranges)
        outs.append(
            np.asarray(
                quant.denoise(
                    latents,
                    context,
                    pooled,
                    num_inference_steps=1,
                    guidance_scale=0.0,
                    height=32,
                    width=32,
                    noise_key=jax.random.key(1),
                    qconfig=qconfig,
                )
            )
        )
    (compiled,) = [fn for key, fn in quant._cache.items() if key[0] == "denoise"]  # one loop
    assert compiled._cache_size() == 1
    assert np.abs(outs[0] - outs[1]).max() > 1e-4  # the configurations really differ


def test_quantization_error_grows_as_bits_drop(pipe, run_dir):
    ref = pipe(PROMPTS, height=32, width=32, seed=2)
    errs = []
    for w, a in [(8, 8), (4, 8), (2, 4)]:
        q = qconfig_for(pipe, QuantSpec(weight_bits=w, act_bits=a), calib=run_dir)
        out = pipe(PROMPTS, height=32, width=32, seed=2, qconfig=q)
        errs.append(float(np.mean((out - ref) ** 2)))
    assert 0 < errs[0] < errs[1] < errs[2]


def test_calibration_resumes_with_identical_ranges(pipe, run_dir, tmp_path):
    config = CalibConfig(prompts=tuple(PROMPTS), height=32, width=32, batch_size=2)
    first = RunDir(run_dir).act_ranges()
    (run_dir / "calib" / "batch_00001.npz").unlink()  # as if killed before the last batch
    (run_dir / "calib" / "act_ranges.npz").unlink()
    again = calibrate(pipe, config, run_dir)
    assert set(first) == set(again) == {layer.name for layer in unet_layers(pipe.unet.config)}
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    split = [n for n in first if n.endswith("conv_shortcut") and n.startswith("up_blocks")]
    assert split and all(first[n].shape == (2, 2) for n in split)  # one range per half
    other = CalibConfig(prompts=tuple(PROMPTS), height=32, width=32, batch_size=3)
    with pytest.raises(ValueError, match="calibrated with other settings"):
        calibrate(pipe, other, run_dir)


def test_released_calibration_loop_chains_running_ranges_and_resumes(pipe, run_dir, tmp_path):
    """The official preset's calibration (`ObserveQuantized`, checked against a numpy
    transcription of the released quantizer in test_observe_released): the result is the
    running ranges after the last batch, each batch continues from the one before, and a
    killed run resumes to the same ranges."""
    config = CalibConfig(
        prompts=tuple(PROMPTS), height=32, width=32, batch_size=2, method="ema", ema_updates=3,
        observe_weight_bits=8, symmetric_weights=True, observe_act_bits=8,
    )  # fmt: skip
    run = tmp_path / "official"
    first = calibrate(pipe, config, run)
    last = RunDir(run).batch_ranges(1)
    for name in first:
        np.testing.assert_array_equal(first[name], last[name])
    (run / "calib" / "batch_00001.npz").unlink()
    (run / "calib" / "act_ranges.npz").unlink()
    again = calibrate(pipe, config, run)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    # batch 1 alone (no running ranges before it) gives other ranges: the chain is real
    alone = tmp_path / "alone"
    calibrate(pipe, CalibConfig(**{**config.__dict__, "prompts": tuple(PROMPTS[2:])}), alone)
    assert any(not np.allclose(first[n], RunDir(alone).act_ranges()[n]) for n in first)
    # and the float model's min/max ranges differ from the released loop's
    minmax = RunDir(run_dir).act_ranges()
    assert any(not np.allclose(first[n], minmax[n]) for n in first)
    with pytest.raises(ValueError, match="method='ema'"):
        CalibConfig(prompts=("a",), observe_act_bits=8)


def test_missing_calibration_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match="no calibrated activation range"):
        qconfig_for(pipe, QuantSpec(weight_bits=8, act_bits=8))


def test_cli_generate_quantized_and_resume(pipe_dir, run_dir, tmp_path, capsys):
    out = tmp_path / "imgs"
    args = [
        "generate",
        "--model",
        str(pipe_dir),
        "--prompt",
        "a red circle",
        "--prompt",
        "a cat",
        "--height",
        "32",
        "--width",
        "32",
        "--weight-bits",
        "8",
        "--act-bits",
        "8",
        "--calib",
        str(run_dir),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    index = json.loads((out / "prompts.json").read_text())
    assert [r["file"] for r in index["images"]] == ["0000.png", "0001.png"]
    assert index["settings"]["quant"] == "W8A8 int"
    stamp = (out / "0000.png").stat().st_mtime_ns
    assert main(args) == 0  # resumed: nothing regenerated
    assert (out / "0000.png").stat().st_mtime_ns == stamp
    # other settings into the same folder: refused (it would orphan the first run's images)
    # unless --overwrite
    assert main([*args[:-2], "--act-bits", "3", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main([*args[:-2], "--act-bits", "3", "--out", str(out), "--overwrite"]) == 0
    # an unsupported bit-width is refused while parsing, before any model loads
    bad = ["generate", "--model", str(pipe_dir), "--prompt", "x", "--weight-bits", "9",
           "--out", str(out)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(bad)
    assert exit_info.value.code == 2
    assert "supported bit-widths" in capsys.readouterr().err
