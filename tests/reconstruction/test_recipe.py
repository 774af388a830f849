"""`mixdq quantize --method ptqd` end to end on a tiny SDXL (Q-Diffusion's reconstruction,
then PTQD): the reconstruct stage runs between acts and export, the exported folder holds the
learned codes and PTQD's correction (folded into conv_out at one step; at two steps stored as
the noise model the loaded pipeline's sampling loop applies), and runs on the integer path."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixdq_jax.api import load_pipeline
from mixdq_jax.cli import main
from mixdq_jax.deploy.checkpoint import NOISE_MODEL_VERSION
from mixdq_jax.deploy.packed import node_at, quantize_weight_codes, unpacked_codes
from mixdq_jax.methods import (
    METHODS,
    RECONSTRUCTION_METHODS,
    BlockReconstruction,
    PTQDCorrection,
    RangeSearch,
)
from mixdq_jax.quant import forward
from mixdq_jax.reconstruction import learned_codes
from mixdq_jax.rundir import RunDir
from mixdq_jax.sensitivity.calibration import load_calibration
from tests.tiny_models import build_sdxl

PROMPTS = ["a red cube", "a blue ball on grass", "a cat", "two green cones"]
# one level (71 layers): quick to compile, still SDXL-shaped (text_time, cross-attention)
SMALL_UNET = dict(
    layers_per_block=1, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",), transformer_layers_per_block=(1,),
    attention_head_dim=(2,),
)  # fmt: skip
BLOCK = "down_blocks.0.resnets.0"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("recon_recipe")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return build_sdxl(root / "pipe", unet_overrides=SMALL_UNET), root / "prompts.txt"


def test_the_cli_offers_the_reconstruction_rows():
    assert tuple(RECONSTRUCTION_METHODS) == ("qdiffusion", "ptqd", "mixdq+adaround", "edadm")
    refiners = {n: [type(r) for r in m.refiners] for n, m in RECONSTRUCTION_METHODS.items()}
    assert refiners["ptqd"] == [RangeSearch, BlockReconstruction, PTQDCorrection]
    assert refiners["edadm"] == [RangeSearch, BlockReconstruction]
    # the earlier rows stay reachable, labelled: min/max ranges, the pooled PTQD fit
    from mixdq_jax.methods import get_method  # noqa: PLC0415

    assert [type(r) for r in get_method("qdiffusion-minmax").refiners] == [BlockReconstruction]
    assert get_method("ptqd-pooled").settings()["ptqd_rule"] == "pooled"
    assert PTQDCorrection not in refiners["qdiffusion"]
    assert RECONSTRUCTION_METHODS["mixdq+adaround"].allocator.name == "mixdq"
    # Q-Diffusion searches its clipping ranges first (test_qdiffusion_settings.py)
    assert all(BlockReconstruction in r for r in refiners.values())
    # runs of the older rows, started before these fields existed, still resume
    assert {"rounding", "ptqd"}.isdisjoint(METHODS["mixdq"].settings())
    assert RECONSTRUCTION_METHODS["ptqd"].settings()["ptqd"] is True


def _quantize(model, run, *args: str) -> None:
    """`mixdq quantize` on the tiny model with the tests' small settings, one block learned."""
    pipe_dir, prompts = model
    code = main(["quantize", "--model", str(pipe_dir), "--prompts", str(prompts),
                 "--num-calib", "2", "--num-select", "1", "--batch-size", "2",
                 "--recon-batch", "2", "--recon-blocks", BLOCK, "--run", str(run),
                 *args])  # fmt: skip
    assert code == 0


@pytest.fixture(scope="module")
def quantized(model, tmp_path_factory):
    """The command's run directory and quantized folder."""
    root = tmp_path_factory.mktemp("ptqd")
    run, out = root / "run", root / "out"
    _quantize(model, run, "--method", "ptqd", "--target", "W4A8", "--recon-iters", "4",
              "--recon-act-iters", "2", "--out", str(out), "--stop-after", "export")
    return run, out


@pytest.fixture(scope="module")
def float_pipe(model):
    return load_pipeline(model[0])


def _searched(run, name: str, kernel) -> np.ndarray:
    """The float kernel clipped as the range search chose (unsplit layers): each output
    channel to ``r [min(w, 0), max(w, 0)]``, ``r = 1 - 0.01 i`` (numpy, from weights.npz)."""
    index = np.load(run / "quantize/W4A8_ptqd/range_search/weights.npz")[name][0]
    w = np.asarray(kernel, np.float32)
    flat = w.reshape(-1, w.shape[-1])
    r = (1.0 - 0.01 * index).astype(np.float32)
    lo, hi = np.minimum(flat.min(0), 0) * r, np.maximum(flat.max(0), 0) * r
    return np.clip(w, lo, hi)


def test_the_folder_holds_the_learned_codes_and_ptqd_and_runs_on_the_integer_path(
    quantized, float_pipe
):
    run, out = quantized
    settings = json.loads((run / "quantize" / "W4A8_ptqd" / "reconstruct" /
                           "settings.json").read_text())  # fmt: skip
    assert settings["iters"] == 4 and settings["blocks"] == [BLOCK]
    stored = RunDir(run).reconstructed_unit("W4A8_ptqd", 0)
    assert stored is not None and float(stored["mse_learned"]) > 0

    quantized = load_pipeline(out)
    plan, packed = quantized.quantized.mode.plan, quantized.quantized.params
    learned_any = False
    for key in stored:
        if not key.startswith("up/"):
            continue
        name = key[3:]
        kernel = _searched(run, name, node_at(float_pipe.params["unet"], name)["kernel"])
        v = jnp.where(jnp.asarray(stored[key]) > 0, 1.0, -1.0)
        want = np.asarray(learned_codes(kernel, v, 4)).reshape(-1, kernel.shape[-1]) - 8
        got = np.asarray(unpacked_codes(node_at(packed, name)["q0"]["w"], plan.layers[name]))
        np.testing.assert_array_equal(got.reshape(want.shape), want)
        learned_any = True
    assert learned_any
    # PTQD: conv_out's codes are the (searched) kernel's, every channel's scale over 1 + k
    kernel = _searched(run, "conv_out", float_pipe.params["unet"]["conv_out"]["kernel"])
    codes, scale, _ = quantize_weight_codes(kernel, 4, symmetric=False)
    lp = plan.layers["conv_out"]
    node = packed["conv_out"]["q0"]
    got = np.asarray(unpacked_codes(node["w"], lp)).reshape(-1, kernel.shape[-1])
    np.testing.assert_array_equal(got, np.asarray(codes).reshape(got.shape))
    ratio = np.asarray(scale) / np.asarray(node["w_scale"])  # 1 + k
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    # the applied k (PTQD's released rule keeps only k > 0; the tiny model's slope is < 0)
    noise = json.loads((run / "quantize/W4A8_ptqd/ptqd/noise_model.json").read_text())
    np.testing.assert_allclose(ratio[0], 1.0 + noise["k"][0], rtol=1e-5)
    # the integer path runs the folder: one UNet evaluation on calibration-shaped inputs
    batch = load_calibration(run, float_pipe).batches[0]
    cond = float_pipe.conditioning(jnp.asarray(batch.context), jnp.asarray(batch.pooled), 0.0,
                                   *float_pipe.image_size)  # fmt: skip
    t = RunDir(run).batch_arrays(0, "timesteps")["timesteps"][0]
    unet, mode = quantized.unet, quantized.quantized.mode
    eps = jax.jit(lambda p: forward(unet, p, None, batch.inputs[0], t, cond, mode=mode))(packed)
    err = np.linalg.norm(np.asarray(eps) - batch.outputs[0]) / np.linalg.norm(batch.outputs[0])
    assert err < 0.5, err


@pytest.fixture(scope="module")
def quantized_two_steps(model, tmp_path_factory):
    """PTQD on a two-step Euler-ancestral run: the correction goes into the sampling loop."""
    root = tmp_path_factory.mktemp("ptqd2")
    run, out = root / "run", root / "out"
    _quantize(model, run, "--method", "ptqd", "--target", "W4A8", "--steps", "2",
              "--recon-iters", "2", "--recon-act-iters", "1", "--out", str(out))
    return run, out


def test_multi_step_ptqd_is_stored_in_the_folder_and_applied_when_sampling(
    quantized_two_steps, float_pipe
):
    run, out = quantized_two_steps
    meta = json.loads((out / "unet" / "mixdq_quant.json").read_text())
    assert meta["format_version"] == NOISE_MODEL_VERSION
    stored = meta["noise_model"]
    report = json.loads((run / "quantize" / "W4A8_ptqd" / "report.json").read_text())
    assert stored["k"] == report["ptqd_k"] and len(stored["k"]) == 2
    assert report["ptqd_std"] == stored["std"]
    # the scheduler's fresh noise, less the residual's share: sqrt(b^2 - (a std/(1+k))^2) / b
    a, b = float_pipe.scheduler.output_terms(float_pipe.scheduler.set_timesteps(2))
    k, std = np.asarray(stored["k"]), np.asarray(stored["std"])
    want = np.sqrt(np.maximum(b[0] ** 2 - (a[0] * std[0] / (1 + k[0])) ** 2, 0)) / b[0]
    assert report["ptqd_noise_scale"][0] == pytest.approx(want, rel=1e-5)
    assert "- PTQD (released fit) per sampling step: slope k" in (
        run / "quantize/W4A8_ptqd/report.md"
    ).read_text()
    timesteps = float_pipe.scheduler.set_timesteps(2).timesteps
    np.testing.assert_array_equal(stored["timesteps"], np.asarray(timesteps, np.float64))
    assert len(stored["bias"][0]) == float_pipe.unet.config.out_channels
    # not folded: conv_out keeps the plain codes and scales of its (searched) kernel
    quantized = load_pipeline(out)
    kernel = _searched(run, "conv_out", float_pipe.params["unet"]["conv_out"]["kernel"])
    _, scale, _ = quantize_weight_codes(kernel, 4, symmetric=False)
    np.testing.assert_allclose(quantized.quantized.params["conv_out"]["q0"]["w_scale"],
                               np.asarray(scale).reshape(-1), rtol=1e-6)  # fmt: skip
    correction = quantized.quantized.correction
    assert correction is not None
    np.testing.assert_array_equal(correction.k, stored["k"])
    kw = dict(num_inference_steps=2, seed=3)
    corrected = quantized(PROMPTS[:1], **kw)
    plain = quantized.with_quantized(quantized.quantized.replace(correction=None))(PROMPTS[:1],
                                                                                  **kw)
    assert np.abs(corrected - plain).max() > 1e-3
    with pytest.raises(ValueError, match=r"fitted for 2 sampling step\(s\)"):
        quantized(PROMPTS[:1], num_inference_steps=1)


def test_a_study_row_of_a_reconstruction_method_is_its_learned_model(model, tmp_path):
    """`mixdq demo --methods naive ptqd`: the PTQD row's evaluation images come from the
    reconstructed UNet (not the float UNet under the row's bits), and the report lists it."""
    pipe_dir, prompts = model
    run = tmp_path / "study"
    code = main(["demo", "--model", str(pipe_dir), "--out", str(run), "--num-calib", "2",
                 "--targets", "W8A8", "--methods", "naive", "ptqd", "--recon-iters", "2",
                 "--recon-act-iters", "1", "--recon-batch", "2", "--recon-blocks", BLOCK,
                 "--eval-prompts", str(prompts), "--eval-num", "2",
                 "--eval-metrics", "ssim,psnr"])  # fmt: skip
    assert code == 0
    assert "| W8A8 | PTQD | 8.00 | 8.00 |" in (run / "report/report.md").read_text()
    # the study exports its headline row (no MixDQ row here: the first one with a packed format)
    from mixdq_jax.deploy import verify_export  # noqa: PLC0415

    assert verify_export(run / "export" / "W8A8_naive") == []

    from mixdq_jax.methods import RECONSTRUCTION_METHODS, Target  # noqa: PLC0415
    from mixdq_jax.reconstruction import ReconConfig  # noqa: PLC0415
    from mixdq_jax.study import StudyConfig  # noqa: PLC0415
    from mixdq_jax.study.run import study_recipe  # noqa: PLC0415

    config = StudyConfig(model=str(pipe_dir), run_dir=run, num_calib=2,
                         reconstruction=ReconConfig(iters=2, act_iters=1, batch_size=2,
                                                    blocks=(BLOCK,)))  # fmt: skip
    float_pipe = load_pipeline(pipe_dir)
    recipe = study_recipe(config, float_pipe)
    row = recipe.allocation(Target.parse("W8A8"), RECONSTRUCTION_METHODS["ptqd"])  # resumed
    learned = recipe.quantized(row)
    assert not np.array_equal(learned.params["conv_out"]["bias"],
                              float_pipe.params["unet"]["conv_out"]["bias"])  # PTQD folded
    texts = [line for line in prompts.read_text().splitlines() if line][:2]
    plain_qc = recipe.qconfig(row.method, row.weight_bits, row.act_bits)
    # image i of an evaluation starts from seed i's latents (`evaluation.images`)
    want = np.concatenate([float_pipe([t], quantized=learned, seed=i)
                           for i, t in enumerate(texts)])  # fmt: skip
    plain = np.concatenate([float_pipe([t], qconfig=plain_qc, seed=i)
                            for i, t in enumerate(texts)])  # fmt: skip
    want, plain = want * 255.0, plain * 255.0
    from PIL import Image  # noqa: PLC0415

    images = sorted((run / "paper_eval" / "W8A8_ptqd" / "images").glob("*.png"))
    got = np.stack([np.asarray(Image.open(p), np.float32) for p in images])
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1.0  # the PNGs round to whole levels
    assert np.abs(got - plain).max() > 1.0


def test_edadm_on_two_steps_keeps_one_sample_per_trajectory(model, tmp_path):
    """EDA-DM on a two-step run: TDAC's choice is written beside the reconstruction, one
    sample per calibration trajectory, and the reconstruction learns from those alone."""
    run = tmp_path / "run"
    # the testbed's shortened EDA-DM: the released one takes 256 calibration prompts
    _quantize(model, run, "--method", "edadm-testbed", "--target", "W4A16", "--steps", "2",
              "--recon-iters", "1", "--stop-after", "reconstruct")
    chosen = json.loads((run / "quantize/W4A16_edadm-testbed/calib_select.json").read_text())
    assert len(chosen["samples_per_step"]) == 2 and sum(chosen["samples_per_step"]) == 2
    recipe = run / "quantize/W4A16_edadm-testbed"
    settings = json.loads((recipe / "reconstruct/settings.json").read_text())
    assert settings["samples"] == 2 and settings["layer_loss_weight"] == 0.5
