"""Sensitivity sweeps on a tiny SDXL: batched == plain per-layer loop, resume, sharding, files."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from mixdq_jax.api import load_pipeline, qconfig_for
from mixdq_jax.calibrate import CalibConfig, calibrate, run_batch
from mixdq_jax.cli import sensitivity as cli_sensitivity
from mixdq_jax.official_format import read_sensitivity
from mixdq_jax.quant import QuantSpec, modes, stack_qconfigs
from mixdq_jax.quant.registry import unet_layers
from mixdq_jax.rundir import RunDir
from mixdq_jax.sensitivity import (
    Evaluator,
    OrthogonalityConfig,
    SweepConfig,
    base_qconfig,
    linear_cka,
    load_calibration,
    orthogonality,
    single_layer_qconfigs,
    sweep,
)
from mixdq_jax.sensitivity.orthogonality import gram
from tests.tiny_models import SMALL_UNET, build_sdxl

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ("a red circle", "a blue square on a green background", "two yellow triangles")
SIZE = 32
CHUNK = 8  # one chunk shape for every in-process sweep: one compile per (metric, kind)
# one layer of each special case: first/last conv, shortcut split, BOS-aware to_k, ff, self-attn
SEL = (
    "conv_in",
    "up_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "conv_out",
)

# Runs with 8 virtual CPU devices (XLA_FLAGS must be set before jax starts): the activation
# SQNR sweep of every layer, sharded over the 8 devices.
SHARDED_SCRIPT = textwrap.dedent(
    """
    import sys
    import jax
    from mixdq_jax.api import load_pipeline
    from mixdq_jax.sensitivity import SweepConfig, sweep
    assert jax.device_count() == 8, jax.devices()
    pipe = load_pipeline(sys.argv[1])
    config = SweepConfig(kinds=("act",), metrics="sqnr", chunk=32)
    sweep(pipe, sys.argv[2], config, progress=False)
    """
)


def _assert_same_db(actual, desired, *, rtol=1e-3, atol=1e-11):
    """SQNR values agree as noise-to-signal ratios ``10^(-dB/10)``, to float precision: a
    program compiled for another batch size or device count differs by float32 roundoff,
    which moves a 100 dB SQNR (noise ratio 1e-10) by tenths of a dB."""
    np.testing.assert_allclose(
        10 ** (-np.asarray(actual) / 10), 10 ** (-np.asarray(desired) / 10), rtol=rtol, atol=atol
    )


def _ssim_np(x: np.ndarray, y: np.ndarray) -> float:
    """Global SSIM (one window = the image, sample covariance), mean over channels."""
    x, y = x.astype(np.float64).reshape(-1, 3), y.astype(np.float64).reshape(-1, 3)
    mx, my = x.mean(0), y.mean(0)
    vx, vy = x.var(0, ddof=1), y.var(0, ddof=1)
    cxy = ((x - mx) * (y - my)).sum(0) / (len(x) - 1)
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("sens_sdxl") / "pipe", unet_overrides=SMALL_UNET)


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return load_pipeline(pipe_dir)


@pytest.fixture(scope="module")
def calib_config():
    return CalibConfig(prompts=PROMPTS, height=SIZE, width=SIZE, batch_size=len(PROMPTS))


@pytest.fixture(scope="module")
def run_dir(pipe, calib_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("sens_run")
    calibrate(pipe, calib_config, run)
    return run


@pytest.fixture(scope="module")
def sharded_job(pipe_dir, run_dir, tmp_path_factory):
    """The 8-virtual-device sweep, started early in its own process (it runs alongside)."""
    run = tmp_path_factory.mktemp("sens_sharded")
    shutil.copytree(run_dir / "calib", run / "calib")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [sys.executable, "-c", SHARDED_SCRIPT, str(pipe_dir), str(run)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    yield proc, run
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def swept(pipe, run_dir, sharded_job):
    config = SweepConfig(kinds=("weight",), metrics=("sqnr", "ssim"), layers=SEL, chunk=CHUNK)
    return sweep(pipe, run_dir, config, progress=False)


@pytest.fixture(scope="module")
def swept_act(pipe, run_dir, sharded_job):
    config = SweepConfig(kinds=("act",), metrics="sqnr", layers=SEL, chunk=CHUNK)
    return sweep(pipe, run_dir, config, progress=False)["act", "sqnr"]


def test_single_layer_configs_are_stacked_with_bits(pipe, run_dir):
    calib = load_calibration(run_dir, pipe)
    base = base_qconfig(pipe, QuantSpec(), calib.ranges)
    tasks = [(SEL[1], 2), (SEL[2], 8), (SEL[1], 4)]
    for kind, arg in (("weight", "w_bits"), ("act", "a_bits")):
        fast = single_layer_qconfigs(base, kind, tasks)
        slow = stack_qconfigs([base.with_bits(**{arg: {n: b}}) for n, b in tasks])
        assert jax.tree.structure(fast) == jax.tree.structure(slow)
        for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))


def test_sweep_equals_plain_per_layer_loop(pipe, run_dir, calib_config, swept):
    """Each chunked, vmapped value == the plain calibration loop run with the config that
    ``qconfig_for`` builds for that one layer (observe mode keeps activations float)."""
    refs = RunDir(run_dir).references()
    ref = refs["unet_outputs"][0].astype(np.float64)
    for name in SEL:
        for i, bits in enumerate((2, 4, 8)):
            spec = QuantSpec(weight_bits={name: bits}, default_weight_bits=16)
            qconfig = qconfig_for(pipe, spec, calib=run_dir)
            plain, _ = run_batch(pipe, PROMPTS, calib_config, 0, qconfig=qconfig)
            np.testing.assert_array_equal(plain["unet_inputs"], refs["unet_inputs"])
            err = np.sum((plain["unet_outputs"][0] - ref) ** 2, axis=(1, 2, 3))
            sqnr = np.mean(10 * np.log10(np.sum(ref**2, axis=(1, 2, 3)) / err))
            pairs = zip(plain["images"], refs["images"], strict=True)
            ssim = np.mean([_ssim_np(a, b) for a, b in pairs])
            _assert_same_db(swept["weight", "sqnr"][name][i], sqnr)
            np.testing.assert_allclose(swept["weight", "ssim"][name][i], ssim, atol=2e-6)


def test_ratio_of_sums_sqnr_is_the_released_formula(pipe, run_dir, calib_config):
    """``sqnr="ratio_of_sums"``: one ``10 log10(sum ref^2 / sum err^2)`` over every row (the
    released ``LossFunction``), against the plain loop; the paper's mean of per-row dB is
    another number on the same errors."""
    evaluator = Evaluator(pipe, load_calibration(run_dir, pipe))
    base = base_qconfig(pipe, QuantSpec(), evaluator.calib.ranges, list(SEL[:2]))
    tasks = [(SEL[0], 2), (SEL[1], 4)]
    qconfigs = single_layer_qconfigs(base, "weight", tasks)
    got = evaluator.sqnr_db("weight", qconfigs, aggregate="ratio_of_sums")
    mean = evaluator.sqnr_db("weight", qconfigs)
    ref = RunDir(run_dir).references()["unet_outputs"][0].astype(np.float64)
    for (name, bits), value, mean_value in zip(tasks, got, mean, strict=True):
        spec = QuantSpec(weight_bits={name: bits}, default_weight_bits=16)
        plain, _ = run_batch(pipe, PROMPTS, calib_config, 0, qconfig_for(pipe, spec, calib=run_dir))
        err = (plain["unet_outputs"][0] - ref) ** 2
        _assert_same_db(value, 10 * np.log10(np.sum(ref**2) / np.sum(err)))
        rows = 10 * np.log10(np.sum(ref**2, axis=(1, 2, 3)) / np.sum(err, axis=(1, 2, 3)))
        _assert_same_db(mean_value, np.mean(rows))
        assert abs(value - mean_value) > 1e-6
    with pytest.raises(ValueError, match="SQNR aggregate"):
        evaluator.sqnr_db("weight", qconfigs, aggregate="median")


def test_resume_after_kill_gives_identical_results(pipe, run_dir, swept, monkeypatch):
    folder = run_dir / "sensitivity"
    for metric in ("sqnr", "ssim"):
        chunks = sorted((folder / "weight").glob(f"{metric}_*.npz"))
        assert len(chunks) == 3  # 6 layers x 3 bits in chunks of 8
        chunks[-1].unlink()  # killed before the last chunk was written
    calls = []
    original = Evaluator.evaluate
    monkeypatch.setattr(
        Evaluator, "evaluate",
        lambda self, *a, **k: calls.append(a[:2]) or original(self, *a, **k),
    )
    config = SweepConfig(kinds=("weight",), metrics=("sqnr", "ssim"), layers=SEL, chunk=CHUNK)
    evaluator = Evaluator(pipe, load_calibration(run_dir, pipe))
    again = sweep(pipe, run_dir, config, evaluator=evaluator, progress=False)
    assert calls == [("sqnr", "weight"), ("ssim", "weight")]  # only the deleted chunks
    assert again == swept  # bit-identical
    assert len(evaluator.functions) == 2  # one program per (metric, kind) ...
    assert all(fn._cache_size() == 1 for fn in evaluator.functions.values())  # ... compiled once
    calls.clear()
    assert sweep(pipe, run_dir, config, evaluator=evaluator, progress=False) == swept
    assert not calls  # complete: nothing evaluated
    for metric in ("sqnr", "ssim"):
        assert read_sensitivity(folder / f"weight_{metric}.yaml") == swept["weight", metric]


def test_weight_chunk_quantizes_only_its_swept_layers(pipe, run_dir, swept, monkeypatch):
    """A weight sweep batches every layer's bits, which makes fake quant's "keep float" cond a
    select: every layer computed a dequantized copy per configuration. With the chunk's
    unbatched ``w_active`` hint only the swept layers do; counted at run time by a debug
    callback in the weight quantizer (the program still compiles once), same values."""
    seen = []
    original = modes.quantize_weight

    def counting(w, bits, *, fmt):
        jax.debug.callback(lambda shape=w.shape: seen.append(shape))
        return original(w, bits, fmt=fmt)

    monkeypatch.setattr(modes, "quantize_weight", counting)
    calib = load_calibration(run_dir, pipe)
    evaluator = Evaluator(pipe, calib)
    base = base_qconfig(pipe, QuantSpec(), calib.ranges, SEL)  # six layers: a small program
    tasks = [(SEL[1], 4), (SEL[2], 2)]  # a split conv_shortcut (two parts) and a BOS to_k
    values = evaluator.evaluate("sqnr", "weight", single_layer_qconfigs(base, "weight", tasks))
    jax.effects_barrier()
    layers = {layer.name: layer for layer in unet_layers(pipe.unet.config)}
    (kh, kw, cin, cout), to_k = (layers[name].weight_shape for name, _ in tasks)
    split = layers[SEL[1]].split_channels
    assert sorted(seen) == sorted([(kh, kw, split, cout), (kh, kw, cin - split, cout), to_k])
    assert len(seen) < len(SEL) + 1  # without the hint: the parts of all six layers
    for (name, bits), value in zip(tasks, values, strict=True):
        _assert_same_db(value, swept["weight", "sqnr"][name][(2, 4, 8).index(bits)])
    evaluator.evaluate("sqnr", "weight", single_layer_qconfigs(base, "weight", tasks[::-1]))
    assert [fn._cache_size() for fn in evaluator.functions.values()] == [1]


def test_linear_cka_matches_numpy_feature_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 5, 3))
    y = x.reshape(7, -1) @ rng.normal(size=(15, 11)) + 0.5 * rng.normal(size=(7, 11))
    xc = x.reshape(7, -1) - x.reshape(7, -1).mean(0)
    yc = y - y.mean(0)
    expect = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    got = linear_cka(np.asarray(gram(x)), np.asarray(gram(y)))
    np.testing.assert_allclose(got, expect, rtol=1e-5)
    np.testing.assert_allclose(linear_cka(np.asarray(gram(x)), np.asarray(gram(x))), 1.0)


def test_orthogonality_scores_finite_and_deterministic(pipe, run_dir):
    first = orthogonality(pipe, run_dir, OrthogonalityConfig())
    second = orthogonality(pipe, run_dir, OrthogonalityConfig(), kinds=("weight",))
    names = [layer.name for layer in unet_layers(pipe.unet.config)]
    assert list(first.names) == names and first.steps == (0,)
    assert np.all(np.isfinite(first.importance)) and np.all(first.importance > 0)
    np.testing.assert_array_equal(first.importance, second.importance)
    # the time embedding sees one timestep for all samples: no sample variation, no CKA
    assert "time_embedding.linear_1" in first.degenerate
    orm = first.orm[0]
    ok = ~np.isnan(orm).all(axis=1)
    np.testing.assert_allclose(np.diag(orm)[ok], 1.0, rtol=1e-6)
    np.testing.assert_allclose(orm[np.ix_(ok, ok)], orm[np.ix_(ok, ok)].T)
    scores = read_sensitivity(run_dir / "sensitivity" / "act_orthogonality.yaml")
    assert set(scores) == set(names)
    theta = dict(zip(names, first.importance, strict=True))
    for name, s in scores.items():
        np.testing.assert_allclose(s, [theta[name] * b for b in (2, 4, 8)])


def _cli(argv):
    parser = argparse.ArgumentParser()
    cli_sensitivity.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(pipe, pipe_dir, run_dir, swept, tmp_path, monkeypatch, capsys):
    with pytest.raises(FileNotFoundError, match="mixdq calibrate"):
        _cli(["sensitivity", "--model", str(pipe_dir), "--run", str(tmp_path)])
    monkeypatch.setattr("mixdq_jax.api.load_pipeline", lambda *a, **k: pipe)
    layers = tmp_path / "layers.yaml"
    layers.write_text("".join(f"- model.{n}\n" for n in SEL))
    argv = ["sensitivity", "--model", str(pipe_dir), "--run", str(run_dir), "--kind", "weight"]
    argv += ["--metric", "both", "--chunk", str(CHUNK), "--layers", str(layers), "--no-progress"]
    assert _cli(argv) == 0  # everything already measured: resumes to the end at once
    out = capsys.readouterr().out
    assert "weight ssim: 6 layers" in out and "weight_ssim.yaml" in out
    layers.write_text("- model.nope\n")
    with pytest.raises(ValueError, match="unknown layer"):
        _cli(argv)


# last in the file: the other tests run while the 8-device process works
def test_sharded_sweep_on_8_devices(pipe, sharded_job, swept_act):
    """The whole-model activation sweep sharded over 8 virtual devices: every layer in the
    YAML, equal to the single-device sweep of a subset, more bits is better."""
    proc, run = sharded_job
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    act = read_sensitivity(run / "sensitivity" / "act_sqnr.yaml")
    assert set(act) == {layer.name for layer in unet_layers(pipe.unet.config)}
    for name in SEL:
        _assert_same_db(act[name], swept_act[name], rtol=5e-3, atol=1e-9)
    better = [s[2] > s[1] > s[0] for s in act.values()]
    assert np.mean(better) > 0.9, np.mean(better)
