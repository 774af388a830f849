"""The shipped judge reads every attribute of fresh renders; its metrics behave as defined."""

from __future__ import annotations

import numpy as np
import pytest

from mixdq_jax.testbed import data, judge

needs_judge = pytest.mark.skipif(not judge.JUDGE_PATH.is_file(), reason="judge not trained yet")


@needs_judge
@pytest.mark.parametrize("split", ["train", "test"])
def test_judge_accuracy_on_fresh_renders(split):
    scenes = data.sample_scenes(300, seed=987_654, split=split)  # seeds the judge never saw
    _, preds = judge.read(judge.load_judge(), data.render(scenes))
    acc = judge.accuracy(preds, scenes)
    assert min(acc.values()) >= 0.99, acc
    assert judge.content_score(preds, scenes).content_score >= 0.99


def test_content_score_counts_caption_attributes():
    scenes = data.sample_scenes(30, seed=1)
    labels = scenes.cell_labels()
    perfect = {k: labels[k] for k in ("shape", "background")}
    perfect["colour"] = np.maximum(labels["colour"], 0)
    perfect["size"] = np.maximum(labels["size"], 0)
    assert judge.content_score(perfect, scenes).content_score == 1.0
    wrong_bg = {**perfect, "background": (labels["background"] + 1) % 4}
    report = judge.content_score(wrong_bg, scenes)
    assert report.per_attribute["background"] == 0.0
    n_attrs = [len(a) for a in data.caption_attributes(scenes)]
    np.testing.assert_allclose(report.per_image, 1 - 1 / np.asarray(n_attrs))
    empty = {**perfect, "shape": np.zeros_like(labels["shape"])}
    report = judge.content_score(empty, scenes)
    np.testing.assert_allclose(report.per_image, 1 / np.asarray(n_attrs))


def test_frechet_distance_against_closed_form():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    b = rng.standard_normal((4000, 3)) * 2.0 + 1.0
    # Gaussians with diagonal covariances: |mu_a - mu_b|^2 + sum (s_a - s_b)^2
    sa, sb = a.std(0, ddof=1), b.std(0, ddof=1)
    want = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum((sa - sb) ** 2)
    assert judge.frechet_distance(a, b) == pytest.approx(want, rel=0.02)
    assert judge.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
