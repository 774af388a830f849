"""Fig. 8's baselines are compared fairly: the same bits, the same candidates per layer, and the
numbers land in metrics.json as issue 13 asks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from mixdq_jax.allocation import average_bits
from mixdq_jax.methods import (
    METHODS,
    AllocationContext,
    AllocationOptions,
    Layers,
    Target,
    fingerprint,
)
from mixdq_jax.rundir import RunDir
from mixdq_jax.study import baselines
from mixdq_jax.study.report import allocation_baselines


class _Recipe:
    """What `allocation_baselines` uses of a Recipe; the 'image MSE' of a configuration is
    the summed noise power of its layers (a stand-in renderer, recorded per call)."""

    def __init__(self, tmp_path):
        rng = np.random.default_rng(0)
        names = [f"down.{i}.attn2.to_k" if i % 3 == 0 else f"down.{i}.conv" for i in range(30)]
        self.layers = Layers(
            names=names,
            content=[n for n in names if "attn2" in n],
            quality=[n for n in names if "attn2" not in n],
            w_size={n: float(rng.choice([1.0, 4.0])) for n in names},
            a_size=dict.fromkeys(names, 1.0),
        )
        self.sqnr = {n: tuple(sorted(rng.uniform(0, 60, 3))) for n in names}
        self.ssim = {n: tuple(sorted(rng.uniform(0.5, 1.0, 3))) for n in self.layers.content}
        self.run = RunDir(tmp_path / "run")
        self.config = SimpleNamespace(knobs=AllocationOptions())
        self.rendered: list[dict] = []

    def sensitivities(self, bos_aware: bool = True):
        return {("weight", "sqnr"): self.sqnr, ("weight", "ssim"): self.ssim}

    def context(self, target, method):
        return AllocationContext(layers=self.layers, knobs=self.config.knobs, target=target,
                                 scores=lambda: self.sensitivities(method.bos_aware))  # fmt: skip

    def qconfig(self, method, w_bits, a_bits):
        return dict(w_bits)

    def image_mse(self, bits):
        self.rendered.append(bits)
        idx = {2: 0, 4: 1, 8: 2}
        return float(sum(10 ** (-self.sqnr[n][idx[b]] / 10) for n, b in bits.items()))


def test_baselines_share_the_picks_bits_and_candidates(tmp_path):
    recipe = _Recipe(tmp_path)
    layers = recipe.layers
    chosen = {n: (2 if i % 2 else 8) if n in layers.content else 4 for i, n in
              enumerate(layers.names)}  # fmt: skip
    allocation = SimpleNamespace(
        key="W4A16_mixdq", method=METHODS["mixdq"], weight_bits=chosen,
        target=Target.parse("W4A16"),
    )  # fmt: skip
    # two of the integer program's candidates were scored by the recipe's selection
    ctx = recipe.context(allocation.target, allocation.method)
    cands = allocation.method.allocator.weights(ctx)[:2]
    recipe.run.write_candidate_scores(allocation.key, "weight", {
        "candidates": [{"fingerprint": fingerprint(c), "avg_bits": 4.0} for c in cands],
        "scores": {fingerprint(c): 1e-3 * i for i, c in enumerate(cands)},
    })  # fmt: skip
    out = baselines.allocation_baselines(recipe, allocation, seed=0)
    assert [p["predicted_noise"] for p in out["candidates"]] == [
        pytest.approx(sum(10 ** (-recipe.sqnr[n][{2: 0, 4: 1, 8: 2}[b]] / 10)
                          for n, b in c.items())) for c in cands
    ]  # fmt: skip
    assert [p["image_mse"] for p in out["candidates"]] == [0.0, 1e-3]
    bits = average_bits(chosen, layers.w_size)
    band = recipe.config.knobs.band
    assert out["mixdq"]["avg_bits"] == bits
    # 1 pick + 1 naive + 5 random + 5 perturbed configurations rendered
    assert len(recipe.rendered) == 2 + 2 * baselines.SEEDS
    for config in recipe.rendered:
        assert abs(average_bits(config, layers.w_size) - bits) <= band + 1e-9
        assert all(config[n] in (4, 8) for n in layers.quality)  # quality layers never at 2
    assert out["naive_sorting"]["avg_bits"] <= bits + band
    # cached: a second call renders nothing
    again = baselines.allocation_baselines(recipe, allocation, seed=0)
    assert again == json.loads(json.dumps(out)) and len(recipe.rendered) == 12
    # a schema-2 file written before the predicted noise existed is recomputed, not a
    # KeyError in the report (a run directory of an earlier version resumes)
    path = recipe.run.pareto_path(allocation.key)
    older = json.loads(path.read_text())
    for point in [*older["candidates"], older["mixdq"]]:
        del point["predicted_noise"]
    path.write_text(json.dumps(older))
    assert baselines.allocation_baselines(recipe, allocation, seed=0) == again
    assert len(recipe.rendered) == 24
    metrics = allocation_baselines({"W4A16": out})
    assert set(metrics["W4A16"]) == {"mixdq", "naive_sorting", "random", "perturb_20"}
    assert set(metrics["W4A16"]["random"]) == {"avg_bits", "image_mse"}
    seeds = [p["image_mse"] for p in out["random"]["seeds"]]
    assert metrics["W4A16"]["random"]["image_mse"] == float(np.median(seeds))
