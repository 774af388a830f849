"""Fig. 8 of the paper at one weight budget: the integer program against naive sorting,
random and "perturb 20%" allocations, compared fairly.

Fair means: the same candidate bit-widths per layer as the integer program (content layers
{2, 4, 8}, quality layers {4, 8}), the same average bits as the recipe's pick (each baseline
lands within the budget band of it), the same bits counting (size-weighted weight bits), the
same activations (float, as the weight candidates were picked) and the same image error (MSE vs
float on the recipe's held-out selection captions). Each point also carries the summed
single-layer noise power that the additive model predicts (`allocation.objectives`), the
"sensitivity" axis of the figure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from mixdq_jax.allocation import (
    OFFICIAL_CANDIDATES,
    average_bits,
    naive_sorting,
    perturb,
    random_allocation,
)
from mixdq_jax.allocation.objectives import predicted_noise
from mixdq_jax.io_utils import atomic_write_json
from mixdq_jax.methods import fingerprint
from mixdq_jax.quant.qconfig import FLOAT_BITS
from mixdq_jax.recipe import ChosenBits, Recipe

SCHEMA = 2  # the cached file is recomputed when it was written by another layout
SEEDS = 5  # random and perturbed allocations per budget


def layer_candidates(recipe: Recipe) -> dict[str, tuple[int, ...]]:
    """The integer program's weight candidates per layer (by group)."""
    content, quality = OFFICIAL_CANDIDATES["weight"]
    layers = recipe.layers
    return {n: content for n in layers.content} | {n: quality for n in layers.quality}


def _point(recipe: Recipe, allocation: ChosenBits, bits: Mapping[str, int]) -> dict[str, Any]:
    floats = dict.fromkeys(recipe.layers.names, FLOAT_BITS)
    sqnr = recipe.sensitivities()["weight", "sqnr"]
    return {
        "avg_bits": average_bits(bits, recipe.layers.w_size),
        "image_mse": recipe.image_mse(recipe.qconfig(allocation.method, bits, floats)),
        "predicted_noise": predicted_noise(bits, sqnr),
    }


def _median(points: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "avg_bits": float(np.median([p["avg_bits"] for p in points])),
        "image_mse": float(np.median([p["image_mse"] for p in points])),
        "seeds": points,
    }


def _current(cached: Mapping[str, Any]) -> bool:
    """Whether a cached file has this layout (files of schema 2 written before the predicted
    noise was added lack it: recomputed, not a KeyError in the report)."""
    points = [*cached.get("candidates", []), cached.get("mixdq") or {}]
    return cached.get("schema") == SCHEMA and all("predicted_noise" in p for p in points)


def allocation_baselines(recipe: Recipe, allocation: ChosenBits, seed: int) -> dict[str, Any]:
    """The pick, every candidate it was picked from, and the baselines at the pick's bits
    (cached in ``RUN/configs/<row>.pareto.json``)."""
    run, layers, key = recipe.run, recipe.layers, allocation.key
    path = run.pareto_path(key)
    if path.is_file():
        cached = json.loads(path.read_text())
        if _current(cached):
            return cached
    sqnr = recipe.sensitivities()["weight", "sqnr"]
    state = run.candidate_scores(key, "weight")
    chosen = dict(allocation.weight_bits)
    budget = average_bits(chosen, layers.w_size)
    cands = layer_candidates(recipe)
    band = recipe.config.knobs.band
    naive = naive_sorting(sqnr, layers.w_size, candidates=cands, budget=budget, band=band)
    randoms = [
        random_allocation(layers.w_size, candidates=cands, budget=budget, band=band, seed=seed + s)
        for s in range(SEEDS)
    ]
    perturbed = [
        perturb(chosen, layers.w_size, candidates=cands, budget=budget, band=band, seed=seed + s)
        for s in range(SEEDS)
    ]
    method = allocation.method
    ctx = recipe.context(allocation.target, method)
    bits_of = {fingerprint(c): c for c in method.allocator.weights(ctx)}
    out = {
        "schema": SCHEMA,
        "candidates": [
            {
                "avg_bits": c["avg_bits"],
                "image_mse": state["scores"][c["fingerprint"]],
                "predicted_noise": predicted_noise(bits_of[c["fingerprint"]], sqnr),
            }
            for c in state.get("candidates", [])
        ],
        "mixdq": _point(recipe, allocation, chosen),
        "naive_sorting": _point(recipe, allocation, naive),
        "random": _median([_point(recipe, allocation, b) for b in randoms]),
        "perturb_20": _median([_point(recipe, allocation, b) for b in perturbed]),
    }
    atomic_write_json(path, out)
    return out
