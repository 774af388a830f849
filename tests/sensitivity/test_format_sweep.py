"""The per-layer format as data: the FP8 choice per layer, the format sweep (one compile,
values equal to quantizing that one layer through the plain sampling loop, resume)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.api import load_pipeline, qconfig_for
from mixdq_jax.calibrate import CalibConfig, calibrate, run_batch
from mixdq_jax.models.unet import example_inputs
from mixdq_jax.quant import QuantSpec, forward
from mixdq_jax.quant.forward import unet_arguments
from mixdq_jax.quant.layer_formats import LAYER_FORMATS, parse_formats
from mixdq_jax.rundir import RunDir
from mixdq_jax.sensitivity import Evaluator, load_calibration
from mixdq_jax.sensitivity.formats import FORMAT_SWEEPS, format_sweep
from tests.sensitivity.test_sweep import _ssim_np  # the numpy global SSIM
from tests.tiny_models import SMALL_UNET, build_sdxl

PROMPTS = ("a red circle", "two yellow triangles")
SIZE = 32
CONTENT = "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2"  # SSIM and SQNR
QUALITY = "up_blocks.1.resnets.0.conv_shortcut"  # a shortcut-split conv: SQNR only
SEL = (CONTENT, QUALITY)
FORMATS = parse_formats("float,fp8,w8a8,w4a8,w4a16")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(
        build_sdxl(tmp_path_factory.mktemp("fmt_sdxl") / "pipe", unet_overrides=SMALL_UNET)
    )


@pytest.fixture(scope="module")
def calib_config():
    return CalibConfig(prompts=PROMPTS, height=SIZE, width=SIZE, batch_size=len(PROMPTS))


@pytest.fixture(scope="module")
def run_dir(pipe, calib_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("fmt_run")
    calibrate(pipe, calib_config, run)
    return run


@pytest.fixture(scope="module")
def evaluator(pipe, run_dir):
    return Evaluator(pipe, load_calibration(run_dir, pipe))


@pytest.fixture(scope="module")
def swept(pipe, run_dir, evaluator):
    return format_sweep(pipe, run_dir, FORMATS, chunk=4, layers=SEL, evaluator=evaluator,
                        progress=False)  # fmt: skip


def _sample(pipe, calib_config, spec, run_dir):
    out, _ = run_batch(pipe, PROMPTS, calib_config, 0, qconfig_for(pipe, spec, calib=run_dir),
                       observe=False)  # fmt: skip
    return out


def test_per_layer_fp8_choice_is_the_global_format(pipe, run_dir):
    """Every layer on the FP8 choice == the global FP8 format; none == the int grid (one UNet
    forward, bit for bit)."""
    unet = pipe.unet
    kw = jax.tree.map(
        lambda a: jnp.asarray(np.random.default_rng(0).normal(size=a.shape), a.dtype),
        example_inputs(unet.config, batch=1, height=8, width=8),
    )

    fwd = jax.jit(lambda p, qc, kw: forward(unet, p, qc, *unet_arguments(kw)))

    def run(spec):
        return np.asarray(fwd(pipe.params["unet"], qconfig_for(pipe, spec, calib=run_dir), kw))

    w8a8 = dict(weight_bits=8, act_bits=8)
    every = frozenset(qconfig_for(pipe, QuantSpec()).layers)
    fp8 = run(QuantSpec(fp8_layers=every, **w8a8))
    np.testing.assert_array_equal(fp8, run(QuantSpec(fp8=True, **w8a8)))
    np.testing.assert_array_equal(run(QuantSpec(fp8_layers=frozenset(), **w8a8)),
                                  run(QuantSpec(**w8a8)))  # fmt: skip
    assert not np.array_equal(fp8, run(QuantSpec(**w8a8)))
    with pytest.raises(ValueError, match="fp8_layers"):
        QuantSpec(fp8=True, fp8_layers=frozenset())
    with pytest.raises(ValueError, match="unknown layer"):
        qconfig_for(pipe, QuantSpec(fp8_layers=frozenset({"nope"})))


def test_format_sweep_equals_one_layer_in_the_plain_loop(pipe, run_dir, calib_config, swept):
    refs = RunDir(run_dir).references()
    ref = refs["unet_outputs"][0].astype(np.float64)
    assert set(swept["sqnr"]) == set(SEL) and set(swept["ssim"]) == {CONTENT}
    for name in SEL:
        for fmt in FORMATS[1:]:
            spec = QuantSpec(
                weight_bits={name: fmt.w_bits}, act_bits={name: fmt.a_bits},
                default_weight_bits=16, default_act_bits=16,
                fp8_layers=frozenset({name} if fmt.fp8 else ()),
            )  # fmt: skip
            plain = _sample(pipe, calib_config, spec, run_dir)
            err = np.sum((plain["unet_outputs"][0] - ref) ** 2, axis=(1, 2, 3))
            sqnr = np.mean(10 * np.log10(np.sum(ref**2, axis=(1, 2, 3)) / err))
            np.testing.assert_allclose(
                10 ** (-swept["sqnr"][name][fmt.name] / 10), 10 ** (-sqnr / 10), rtol=1e-3
            )
            if name == CONTENT:
                pairs = zip(plain["images"], refs["images"], strict=True)
                ssim = np.mean([_ssim_np(a, b) for a, b in pairs])
                np.testing.assert_allclose(swept["ssim"][name][fmt.name], ssim, atol=2e-6)
    # formats differ: w4a16 (weights only) and w4a8 cannot score the same on a real layer
    assert swept["sqnr"][QUALITY]["w4a8"] < swept["sqnr"][QUALITY]["w4a16"]


def test_format_sweep_compiles_once_and_resumes(pipe, run_dir, evaluator, swept, monkeypatch):
    """8 (layer, format) SQNR configurations ran as 2 chunks of 4: one program, one compile;
    a rerun reads every chunk and evaluates nothing."""
    programs = {k: f for k, f in evaluator.functions.items() if k[1] == "format"}
    assert {k[0] for k in programs} == {"sqnr", "ssim"}
    assert all(f._cache_size() == 1 for f in programs.values())
    chunks = sorted((run_dir / FORMAT_SWEEPS / "format").glob("sqnr_*.npz"))
    assert len(chunks) == 2

    def boom(*a, **k):
        raise AssertionError("a resumed format sweep evaluated again")

    monkeypatch.setattr(evaluator, "evaluate", boom)
    again = format_sweep(pipe, run_dir, FORMATS, chunk=4, layers=SEL, evaluator=evaluator,
                         progress=False)  # fmt: skip
    assert again == swept


def test_format_sweep_refuses_what_it_cannot_sweep(pipe, run_dir, evaluator):
    with pytest.raises(ValueError, match="w4a4lr"):
        format_sweep(pipe, run_dir, [LAYER_FORMATS["w4a4lr"]], layers=SEL, evaluator=evaluator)
    with pytest.raises(ValueError, match="unknown format"):
        parse_formats("float,int3")
    assert [f.name for f in parse_formats("w8a8")] == ["float", "w8a8"]
