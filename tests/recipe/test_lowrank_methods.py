"""The low-rank methods: A4 targets, their allocations, the ``--lowrank-*`` options, and
``svdquant`` through the whole recipe on a tiny SDXL (a search killed part-way resumes to
the uninterrupted result)."""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace

import numpy as np
import pytest

from mixdq_jax.api import load_pipeline
from mixdq_jax.cli.format_args import with_lowrank_args
from mixdq_jax.methods import (
    LOWRANK,
    AllocationContext,
    AllocationOptions,
    Layers,
    LowRankSettings,
    Target,
    act_budget,
    get_method,
)
from mixdq_jax.methods import lowrank as prep
from mixdq_jax.recipe import RecipeConfig, quantize
from tests.tiny_models import build_sdxl

PROMPTS = ["a red cube", "a blue ball on grass", "a cat", "two green cones"]
SMALL_UNET = dict(layers_per_block=1, transformer_layers_per_block=(1, 1))


def _layers(n: int = 40) -> Layers:
    names = [f"l{i}" for i in range(n)]
    return Layers(names=names, content=names[: n // 2], quality=names[n // 2 :],
                  w_size=dict.fromkeys(names, 100.0),
                  a_size={nm: 50.0 + i for i, nm in enumerate(names)})  # fmt: skip


def _scores(layers: Layers) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for kind in ("weight", "act"):
        # scores at (2, 4, 8) bits: SSIM-like rising to 1, SQNR dB rising
        out[kind, "ssim"] = {n: tuple(np.sort(rng.uniform(0.5, 1.0, 3))) for n in layers.names}
        out[kind, "sqnr"] = {n: tuple(np.sort(rng.uniform(0.0, 40.0, 3))) for n in layers.names}
    return out


def test_a4_targets_average_four_bits_over_the_quantized_layers_mixing_2_4_8():
    layers = _layers()
    target = Target.parse("W4A4")
    knobs = AllocationOptions()
    assert act_budget(layers, target, knobs, {"l0"}) == 4.0
    ctx = AllocationContext(layers=layers, knobs=knobs, target=target,
                            scores=lambda: _scores(layers))  # fmt: skip
    mixdq = get_method("mixdq+lowrank")
    protected = mixdq.allocator.protected(ctx)
    cands = mixdq.allocator.acts(ctx, protected)
    assert cands
    for bits in cands:
        assert {bits[n] for n in protected} == {16}
        rest = {n: b for n, b in bits.items() if n not in protected}
        assert set(rest.values()) <= {2, 4, 8}
        avg = sum(layers.a_size[n] * b for n, b in rest.items()) / sum(
            layers.a_size[n] for n in rest
        )
        assert avg <= 4.0 + knobs.band
    assert any(len(set(bits.values()) - {16}) > 1 for bits in cands)  # mixed, not uniform


def test_svdquant_keeps_its_16_bit_layers_and_quantizes_every_other():
    names = ["conv_in", "time_embedding.linear_1", "add_embedding.linear_2", "down_blocks.0.x",
             "conv_out", "conv_in_other"]  # fmt: skip
    layers = Layers(names=names, content=names, quality=[], w_size=dict.fromkeys(names, 1.0),
                    a_size=dict.fromkeys(names, 1.0))  # fmt: skip
    ctx = AllocationContext(layers=layers, knobs=AllocationOptions(),
                            target=Target.parse("W4A4"), scores=lambda: {})  # fmt: skip
    method = get_method("svdquant")
    assert method.format == LOWRANK and method.bos_aware is False
    (w,) = method.allocator.weights(ctx)
    (a,) = method.allocator.acts(ctx, method.allocator.protected(ctx))
    kept = {"conv_in", "time_embedding.linear_1", "add_embedding.linear_2", "conv_out"}
    assert {n for n, b in w.items() if b == 16} == kept == {n for n, b in a.items() if b == 16}
    assert w["down_blocks.0.x"] == a["conv_in_other"] == 4


def test_rank_fraction_sizes_each_branch_and_the_options_reach_the_method():
    settings = LowRankSettings(rank_fraction=0.05)
    assert settings.layer_rank(1280, 1280) == 32  # SVDQuant's rank on SDXL's wide layers
    assert settings.layer_rank(64, 64) == 2 and settings.layer_rank(4, 4) == 1
    assert LowRankSettings().layer_rank(64, 64) == 32
    args = argparse.Namespace(lowrank_rank=None, lowrank_fraction=0.05, lowrank_group=32)
    method = with_lowrank_args(get_method("svdquant"), args)
    assert method.format.lowrank.rank_fraction == 0.05 and method.format.group_size == 32
    assert method.format.tag != LOWRANK.tag and method.format.sweeps.endswith(method.format.tag)
    assert with_lowrank_args(get_method("mixdq"), argparse.Namespace()) is get_method("mixdq")
    with pytest.raises(ValueError, match="method mixdq has no low-rank branch"):
        with_lowrank_args(get_method("mixdq"), args)


class Killed(BaseException):
    """Stands for SIGKILL."""


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return build_sdxl(tmp_path_factory.mktemp("lowrank") / "pipe", unet_overrides=SMALL_UNET)


def test_svdquant_runs_the_recipe_and_a_killed_search_resumes(pipe_dir, tmp_path, monkeypatch):
    pipe = load_pipeline(pipe_dir)
    fast = replace(LOWRANK, lowrank=LowRankSettings(rank=4, alphas=(0.3, 0.6), rows=32))
    method = replace(get_method("svdquant"), format=fast)
    config = RecipeConfig(calib_prompts=PROMPTS[:2], select_prompts=PROMPTS[2:3],
                          batch_size=1)  # fmt: skip
    kw = dict(target=Target.parse("W4A4"), method=method)
    quantize(pipe, tmp_path / "ref", config, stop_after="lowrank", **kw)
    tag = f"{fast.tag}-nobos"  # svdquant has no BOS handling: its own statistics
    layers = sorted((tmp_path / "ref" / "lowrank" / tag / "layers").iterdir())
    assert len(layers) == 85

    run = tmp_path / "killed"
    shutil.copytree(tmp_path / "ref" / "calib", run / "calib")
    original, calls = prep.search, {"n": 0}

    def dying(*args, **kwargs):
        if calls["n"] >= 30:
            raise Killed
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(prep, "search", dying)
    with pytest.raises(Killed):
        quantize(pipe, run, config, **kw)
    assert len(list((run / "lowrank" / tag / "layers").iterdir())) == 30
    monkeypatch.setattr(prep, "search", original)
    report = quantize(pipe, run, config, **kw)  # resumes the search, then every later stage
    for path in layers:
        with np.load(path) as a, np.load(run / "lowrank" / tag / "layers" / path.name) as b:
            for key in ("smooth", "down", "up", "alpha"):
                np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert report["method"] == "svdquant" and report["weight_avg_bits"] < 16
    assert report["act_float_layers"] == [
        "add_embedding.linear_1", "add_embedding.linear_2", "conv_in", "conv_out",
        "time_embedding.linear_1", "time_embedding.linear_2",
    ]  # fmt: skip
    assert np.isfinite(report["psnr_vs_fp"]) and report["psnr_vs_fp"] > 20
    # another rank is another format: its files never mix with these
    other = replace(fast, lowrank=replace(fast.lowrank, rank=2))
    assert other.tag != fast.tag
