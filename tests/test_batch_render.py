"""The selection's batched rendering (`mixdq_jax.batch_render`): stacked candidates through
one compiled program give the images of one pipeline call per candidate (the reference), the
recipe's scores and pick are those of the per-call loop, and a non-finite candidate is named."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from mixdq_jax.api import load_pipeline
from mixdq_jax.batch_render import BatchRenderer, RenderSettings, batched_leaves
from mixdq_jax.pipeline import NonFiniteError
from mixdq_jax.quant.qconfig import QuantSpec
from mixdq_jax.quant.registry import layer_splits, unet_layers
from mixdq_jax.recipe import PRESETS, RecipeConfig
from mixdq_jax.recipe.run import Recipe
from tests.tiny_models import build_sdxl

PROMPTS = ("a red cube", "two green cones")  # two prompt batches of one (one shape)
SIZE = 64  # pixels: an 8x8 latent
SMALL_UNET = dict(layers_per_block=1, transformer_layers_per_block=(1, 1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pipe = load_pipeline(build_sdxl(tmp_path_factory.mktemp("render") / "pipe",
                                    unet_overrides=SMALL_UNET))  # fmt: skip
    splits = layer_splits(unet_layers(pipe.unet.config))
    names = sorted(splits)
    ranges = {n: np.array([[-3.0, 3.0]] * (1 if s is None else 2), np.float32)
              for n, s in splits.items()}  # fmt: skip

    def qconfig(w, a):
        return QuantSpec(weight_bits=w, act_bits=a).to_qconfig(splits, ranges)

    half = {n: (4 if i % 2 else 8) for i, n in enumerate(names)}
    weights = [qconfig(8, 16), qconfig(4, 16), qconfig(half, 16), qconfig(2, 16)]
    acts = [qconfig(8, 8), qconfig(8, {n: (4 if i % 3 == 0 else 8) for i, n in enumerate(names)})]
    return pipe, weights, acts


def _settings(prompts=PROMPTS):
    return RenderSettings(prompts=prompts, steps=1, guidance_scale=0.0, height=SIZE,
                          width=SIZE, seed=3, batch_size=1)  # fmt: skip


@pytest.fixture(scope="module")
def per_call(setup):
    """The reference: `Pipeline.__call__` per prompt batch (seed + batch index), per config."""
    pipe, weights, acts = setup
    return [
        np.concatenate([np.asarray(pipe([p], height=SIZE, width=SIZE, seed=3 + b,
                                        qconfig=qconfig))  # fmt: skip
                        for b, p in enumerate(PROMPTS)])  # fmt: skip
        for qconfig in [*weights, *acts]
    ]


@pytest.fixture(scope="module")
def renderers(setup):
    """One renderer per way of running a chunk, shared so that the tests reuse its programs."""
    return {p: BatchRenderer(setup[0], _settings(), parallel=p) for p in ("map", "vmap")}


@pytest.mark.parametrize("parallel", ["map", "vmap"])
def test_a_chunked_pick_renders_the_pipeline_calls_images_under_one_compile(
    setup, per_call, renderers, parallel
):
    """Four weight candidates in chunks of 3 (the last padded) and two activation candidates:
    every image equals the pipeline call's; one compile serves every chunk of a pick, and
    under lax.map the activation pick reuses the weight pick's program."""
    _, weights, acts = setup
    renderer = renderers[parallel]
    got = {}
    for idx, images in renderer.render(weights, chunk=3):
        assert images.shape == (len(idx), len(PROMPTS), SIZE, SIZE, 3)
        got.update({i: im for i, im in zip(idx, images, strict=True)})
    assert sorted(got) == [0, 1, 2, 3]
    for i in range(len(weights)):  # weights only: the same arithmetic
        np.testing.assert_allclose(got[i], per_call[i], atol=2e-5, err_msg=str(i))
    (fn,) = renderer.programs.values()
    assert fn._cache_size() == 1
    act_images = np.concatenate([im for _, im in renderer.render(acts, chunk=3)])
    for i in range(len(acts)):
        # 8/4-bit activations: a code on a rounding boundary may flip under another batch
        # shape and grow through the network; most pixels must still agree exactly
        diff = np.abs(act_images[i] - per_call[len(weights) + i])
        assert np.mean(diff) < 2e-3 and np.mean(diff < 1e-4) > 0.9, (i, diff.mean())
    assert len(renderer.programs) == (1 if parallel == "map" else 2)
    assert all(fn._cache_size() == 1 for fn in renderer.programs.values())


def test_the_recipes_batched_scores_are_the_per_call_scores(setup, tmp_path):
    """`Recipe.selection_errors` with chunks of 3 against chunks of 1 (a pipeline call each),
    under both presets' scores: image MSE on every prompt and the released uint8 pick."""
    pipe, weights, _ = setup
    for preset in ("ours", "official"):
        config = RecipeConfig(calib_prompts=("x",), select_prompts=PROMPTS, height=SIZE,
                              width=SIZE, seed=3, batch_size=1, preset=PRESETS[preset],
                              selection_parallel="map")  # fmt: skip
        recipe = Recipe(pipe, tmp_path / preset, config)
        loop = [e for _, errs in recipe.selection_errors(iter(weights), chunk=1) for e in errs]
        batched = [e for _, errs in recipe.selection_errors(weights, chunk=3) for e in errs]
        np.testing.assert_allclose(batched, loop, rtol=1e-3, atol=1e-9, err_msg=preset)
        assert np.argmin(batched) == np.argmin(loop)
        assert len(set(np.round(loop, 9))) > 1  # the candidates do differ


def test_a_non_finite_candidate_is_named(setup, renderers):
    """A candidate whose activation range is NaN at one layer: the error names the stage
    and the candidate's index, not a NaN score that would win or lose the pick at random."""
    _, _, acts = setup
    name = next(n for n in acts[0].layers if n.startswith("up_blocks"))
    layer = acts[0].layers[name]
    broken = replace(layer, a_range=np.full_like(np.asarray(layer.a_range), np.nan))
    bad = replace(acts[0], layers={**acts[0].layers, name: broken})
    with pytest.raises(NonFiniteError, match="candidate 1") as err:  # the map program again
        list(renderers["map"].render([acts[0], bad], chunk=3))
    assert err.value.stage == "UNet"


def test_batched_leaves_under_vmap_are_those_that_differ_and_never_none():
    a, b = np.zeros(3), np.ones(3)
    assert batched_leaves([(a, a), (a, b), (b, b)], "vmap") == (False, True, False)
    # one candidate left (a resumed pick), or identical ones: vmap still needs a batched leaf
    assert batched_leaves([(a,), (b,)], "vmap") == (True, False)
    assert batched_leaves([(a, a), (b, b)], "vmap") == (True, False)
    assert batched_leaves([(a, a), (a, b)], "map") == (True, True)
