"""The testbed tokenizer files: standard CLIP format, one token per caption word."""

from __future__ import annotations

import numpy as np
import pytest

from mixdq_jax.testbed import data, vocab
from mixdq_jax.tokenizer import CLIPTokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    info = vocab.write_tokenizer(path, pad_token="!")
    return path, info


def test_every_word_is_one_token(folder):
    path, info = folder
    tok = CLIPTokenizer.from_pretrained(path)
    for word in data.vocabulary_words():
        assert len(tok.encode(word)) == 1, word
    assert info["eos"] == info["vocab_size"] - 1 and info["bos"] == info["vocab_size"] - 2


def test_matches_transformers(folder):
    transformers = pytest.importorskip("transformers")
    path, _ = folder
    captions = list(data.sample_scenes(20, seed=0).captions) + ["an unknown word, ok?"]
    ours = CLIPTokenizer.from_pretrained(path)(captions)
    ref = transformers.CLIPTokenizer.from_pretrained(path)
    want = ref(captions, padding="max_length", max_length=77).input_ids
    np.testing.assert_array_equal(ours, np.asarray(want))
