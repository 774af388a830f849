"""The tokenizer on SDXL-turbo's real CLIP vocabulary (49,408 tokens) against transformers'
``CLIPTokenizer`` on the same files: both of SDXL's layouts, the shipped calibration prompts and
the edge cases of `tests/test_tokenizer.py`."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from mixdq_jax.tokenizer import CLIPTokenizer
from tests.reference_data import sdxl_turbo_tokenizers
from tests.test_tokenizer import _prompts

CALIB = "mixdq_jax/data/calib_prompts.txt"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sdxl_turbo_tokenizers(tmp_path_factory.mktemp("sdxl_turbo_tokenizers"))


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_real_vocab_matches_transformers(folder, name):
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder / name))
    ours = CLIPTokenizer.from_pretrained(folder / name)
    assert len(ours.vocab) == len(ref.get_vocab()) == 49408
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id,
    )  # fmt: skip
    calib = [line for line in open(CALIB).read().splitlines() if line.strip()]
    long = "a photo of an astronaut riding a horse on mars, " * 12 + "the very end"
    prompts = calib + _prompts() + [long]
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    got = ours(prompts)
    assert got.shape == (len(prompts), 77)
    bad = [p for p, e, g in zip(prompts, expected, got, strict=True) if list(e) != g.tolist()]
    assert not bad, bad[:3]
    # a known id: "a" is 320 in CLIP's vocabulary, the start token 49406, the end 49407
    assert ours(["a"])[0, :3].tolist() == [49406, 320, 49407]
    ids = ours([long])[0]  # truncated: the end token last, no padding before it
    assert ids[-1] == ours.eos_token_id and np.all(ids[:-1] != ours.pad_token_id)
