"""Prompts from a COCO captions file (written here in the distributed layout) and text files."""

from __future__ import annotations

import json

import pytest

from mixdq_jax.evaluation.coco import load_prompts

# image 42 first appears before image 7; each image has several captions, interleaved
ANNOTATIONS = [
    {"image_id": 42, "id": 1, "caption": "A man riding a  wave on top of a surfboard.\n"},
    {"image_id": 7, "id": 2, "caption": "A kitchen with a stove."},
    {"image_id": 42, "id": 3, "caption": "A surfer in the ocean."},
    {"image_id": 9, "id": 4, "caption": "Two dogs on a couch."},
    {"image_id": 7, "id": 5, "caption": "An oven next to a sink."},
    {"image_id": 11, "id": 6, "caption": "A red bus on a street."},
    {"image_id": 9, "id": 7, "caption": "Dogs sleeping."},
]


@pytest.fixture
def coco(tmp_path):
    path = tmp_path / "captions_val2014.json"
    data = {"info": {}, "images": [{"id": i} for i in (7, 9, 11, 42)],
            "annotations": ANNOTATIONS}  # fmt: skip
    path.write_text(json.dumps(data))
    return path


def test_first_n_is_one_caption_per_image_in_file_order(coco):
    ps = load_prompts(coco, num=3)
    assert ps.texts == ["A man riding a wave on top of a surfboard.", "A kitchen with a stove.",
                        "Two dogs on a couch."]  # fmt: skip
    assert [p.image_id for p in ps.prompts] == [42, 7, 9]
    assert ps.settings() == {"source": str(coco), "kind": "coco", "select": "first", "seed": 0,
                             "num": 3, "available": 4}  # fmt: skip
    assert len(load_prompts(coco).prompts) == 4  # all images


def test_random_is_seeded_and_one_caption_of_each_image(coco):
    by_image = {}
    for ann in ANNOTATIONS:
        by_image.setdefault(ann["image_id"], set()).add(" ".join(ann["caption"].split()))
    seen = set()
    for seed in range(8):
        ps = load_prompts(coco, num=3, select="random", seed=seed)
        ids = [p.image_id for p in ps.prompts]
        assert len(set(ids)) == 3
        assert all(p.text in by_image[p.image_id] for p in ps.prompts)
        assert ps == load_prompts(coco, num=3, select="random", seed=seed)
        seen.update((p.image_id, p.text) for p in ps.prompts)
    assert len(seen) > 4  # different seeds pick different images and captions


def test_text_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\n\n  a   dog \na bird\n")
    assert load_prompts(path).texts == ["a cat", "a dog", "a bird"]
    assert load_prompts(path, num=2).texts == ["a cat", "a dog"]
    picked = load_prompts(path, num=2, select="random", seed=3).texts
    assert len(set(picked)) == 2 and set(picked) <= {"a cat", "a dog", "a bird"}


def test_bad_input_names_the_file(tmp_path, coco):
    with pytest.raises(ValueError, match="asked for 5 prompts but the file has 4 images"):
        load_prompts(coco, num=5)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="bad.json: a COCO captions file has a top-level"):
        load_prompts(bad)
    bad.write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\].*lacks 'image_id' or 'caption'"):
        load_prompts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt: no prompts"):
        load_prompts(empty)
    with pytest.raises(ValueError, match="select must be one of"):
        load_prompts(coco, select="last")
