"""The scene generator: deterministic, splits disjoint by attribute combination, renders right."""

from __future__ import annotations

import numpy as np
import pytest

from mixdq_jax.testbed import data


def test_deterministic_from_seed():
    a = data.sample_scenes(50, seed=3, split="train")
    b = data.sample_scenes(50, seed=3, split="train")
    assert a.captions == b.captions
    np.testing.assert_array_equal(data.render(a), data.render(b))
    c = data.sample_scenes(50, seed=4, split="train")
    assert a.captions != c.captions


def _triples(scenes: data.Scenes) -> set[tuple[str, str, str]]:
    out = set()
    for i in range(len(scenes)):
        for s in range(2):
            if scenes.present[i, s]:
                out.add((data.SHAPES[scenes.shape[i, s]], data.COLOURS[scenes.colour[i, s]],
                         data.BACKGROUNDS[scenes.background[i]]))  # fmt: skip
    return out


def test_splits_disjoint_by_combination():
    scenes = {s: data.sample_scenes(600, seed=0, split=s) for s in data.SPLITS}
    captions = {s: set(v.captions) for s, v in scenes.items()}
    assert not captions["train"] & captions["test"]
    assert not captions["train"] & captions["val"]
    assert not captions["val"] & captions["test"]
    assert not _triples(scenes["train"]) & (data.TEST_TRIPLES | data.VAL_TRIPLES)
    assert not _triples(scenes["val"]) & data.TEST_TRIPLES
    # every test scene holds a held-out triple, named in its caption
    for caption in scenes["test"].captions:
        named = {(s, c, b) for s, c, b in data.TEST_TRIPLES if f"{c} {s}" in caption
                 and (f"{b} background" in caption or caption.endswith(f"on {b}"))}  # fmt: skip
        assert named, caption
    # ... while every pair inside a held-out triple occurs in training
    train = _triples(scenes["train"])
    for s, c, b in data.TEST_TRIPLES:
        assert any(t[:2] == (s, c) for t in train), (s, c)
        assert any(t[0] == s and t[2] == b for t in train), (s, b)
        assert any(t[1] == c and t[2] == b for t in train), (c, b)


def test_captions_name_every_attribute():
    scenes = data.sample_scenes(200, seed=1, split="train")
    for i, caption in enumerate(scenes.captions):
        assert data.BACKGROUNDS[scenes.background[i]] in caption
        for s in range(1 + int(scenes.present[i, 1])):
            colour, shape = data.COLOURS[scenes.colour[i, s]], data.SHAPES[scenes.shape[i, s]]
            assert f"{colour} {shape}" in caption
        if data.KINDS[scenes.kind[i]] == "relation":
            assert any(r in caption for r in data.RELATIONS)
        words = set(caption.replace(",", " ").split())
        assert words <= set(data.vocabulary_words()), caption


@pytest.mark.parametrize("kind", range(3))
def test_render_colours_at_object_centres(kind):
    scenes = data.sample_scenes(300, seed=2, split="train")
    images = data.render(scenes)
    assert images.shape == (300, 64, 64, 3) and images.dtype == np.float32
    rows = np.flatnonzero(scenes.kind == kind)
    for i in rows[:40]:
        for s in range(1 + int(scenes.present[i, 1])):
            cell = scenes.cell[i, s]
            y = int(data.CELL_CENTRES[cell // 3] + scenes.offset[i, s, 0] + 1.0)
            x = int(data.CELL_CENTRES[cell % 3] + scenes.offset[i, s, 1])
            want = data.COLOUR_RGB[scenes.colour[i, s]]
            np.testing.assert_allclose(images[i, y, x], want, atol=1e-6)
        labels = scenes.cell_labels()
        empty = np.flatnonzero(labels["shape"][i] == 0)
        for cell in empty:  # the centre of an empty cell shows the background
            y, x = int(data.CELL_CENTRES[cell // 3]), int(data.CELL_CENTRES[cell % 3])
            want = data.BACKGROUND_RGB[scenes.background[i]]
            np.testing.assert_allclose(images[i, y, x], want, atol=1e-6)


def test_relation_layout_is_fixed():
    scenes = data.sample_scenes(300, seed=5, split="train")
    for i in np.flatnonzero(scenes.kind == data.KINDS.index("relation")):
        rel = next(k for k, r in enumerate(data.RELATIONS) if r in scenes.captions[i])
        assert tuple(scenes.cell[i]) == data.RELATION_CELLS[rel]
