"""Pure-Python CLIP tokenizer against transformers 5 ``CLIPTokenizer`` on real BPE files.

The vocab and merges are learnt in the test from a small English corpus, in the CLIP file format
(256 byte symbols, their ``</w>`` forms, one entry per merge, then the two special tokens), so
BPE ranks, word ends and byte-level mapping are all exercised; the config files follow the three
layouts found in diffusers repos (SD1.5 legacy dicts, SDXL ``tokenizer_2`` with pad "!", plain).
"""

import collections
import json
import random
import warnings

import numpy as np
import pytest
import transformers

from mixdq_jax.tokenizer import CLIPTokenizer

CORPUS = (
    """
A photo of an astronaut riding a horse on Mars. The cat's sitting on the mat; it isn't moving!
Portrait of a woman, oil painting, highly detailed, 4k, trending on artstation. Don't stop,
we're here, they've gone, I'm fine, you'll see, he'd say. A cinematic shot of the mountains at
sunset, golden hour, 35mm film. Teddy bears working on new AI research underwater with 1990s
technology. Aaaa bbbb cccc!!! ... ??? "quoted" (brackets) [square] {curly} email@example.com
a red bottle of wine on a wooden table next to two glasses; the the the the; running jumping
"""
    * 3
)
N_MERGES = 200  # fewer than the corpus allows, so its words still split into subwords
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode():
    """GPT-2 table, written from its definition (independent of the library's copy)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(rest)}


def _learn_bpe(corpus, n_merges):
    b2u = _bytes_to_unicode()
    counts = collections.Counter(corpus.lower().split())
    words = {}
    for w in counts:
        syms = [b2u[b] for b in w.encode()]
        syms[-1] += "</w>"
        words[w] = syms
    alphabet = list(b2u.values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, syms in words.items():
            for pair in zip(syms, syms[1:], strict=False):
                pairs[pair] += counts[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        if a + b not in vocab:
            vocab.append(a + b)
        for w, syms in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out
    return vocab + [BOS, EOS], merges


def _token(content, normalized, **extra):
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    } | extra


def _write(folder, vocab, merges, config, special_map):
    folder.mkdir()
    ids = {t: i for i, t in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tok")
    vocab, merges = _learn_bpe(CORPUS, N_MERGES)
    assert len(merges) == N_MERGES
    legacy = lambda c: {"__type": "AddedToken", **_token(c, True)}  # noqa: E731
    bos_id, eos_id = len(vocab) - 2, len(vocab) - 1
    return {
        # SD1.5 text_encoder tokenizer: legacy AddedToken dicts, pads with <|endoftext|>.
        "sd15": _write(
            root / "sd15",
            vocab,
            merges,
            {
                "bos_token": legacy(BOS),
                "eos_token": legacy(EOS),
                "unk_token": legacy(EOS),
                "pad_token": EOS,
                "do_lower_case": True,
                "errors": "replace",
                "model_max_length": 77,
                "tokenizer_class": "CLIPTokenizer",
            },
            {
                "bos_token": _token(BOS, True),
                "eos_token": _token(EOS, True),
                "unk_token": _token(EOS, True),
                "pad_token": EOS,
            },
        ),
        # SDXL tokenizer_2: added_tokens_decoder, pads with "!" (id 0).
        "sdxl2": _write(
            root / "sdxl2",
            vocab,
            merges,
            {
                "added_tokens_decoder": {
                    "0": _token("!", False, special=True),
                    str(bos_id): _token(BOS, True, special=True),
                    str(eos_id): _token(EOS, False, special=True),
                },
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": "!",
                "model_max_length": 77,
                "tokenizer_class": "CLIPTokenizer",
            },
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": "!"},
        ),
        # Plain strings everywhere.
        "plain": _write(
            root / "plain",
            vocab,
            merges,
            {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"},
            {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS},
        ),
    }


def _prompts():
    fixed = [
        "A photo of an astronaut riding a horse on Mars.",
        "a photo of a cat!",
        "Hello  World!!!  ",
        "!hello!",
        "   leading and trailing   ",
        "MiXeD CaSe WoRdS",
        "tabs\tand\nnewlines\r\nhere",
        "4k, 35mm, 1990s, 3.14159, 2024-01-01",
        "the cat's toy isn't here, we're sure you'll see what I'd've done",
        "it 'S ok 'T",
        "'''s quotes ''",
        "email@example.com (brackets) [x] {y} <z>",
        "café naïve résumé ÉCOLE Straße",
        "e\u0301 vs \u00e9 (NFC)",
        "ΟΔΟΣ Σα final sigma",
        "İstanbul",
        "日本語のテキスト",
        "emoji 🙂🚀 mix",
        "zero\u200bwidth",
        "nbsp\u00a0and\u3000wide",
        "a <|endoftext|> inside",
        "x<|startoftext|>y",
        "<|EndOfText|> case",
        "",
        " ",
        "aaaaaaaaaaaa bbbbbbbb the the the",
        "running jumping sitting",
    ]
    rng = random.Random(0)
    alphabet = "aAbBtThHeEsS '!?.,;:-_dDlLmM0123456789\n\t<|>éÉñßΣσİ日本🙂\u0301\u00a0"
    randoms = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(150)]
    return fixed + randoms


@pytest.mark.parametrize("layout", ["sd15", "sdxl2", "plain"])
def test_ids_match_transformers(folders, layout):
    ref = transformers.CLIPTokenizer.from_pretrained(str(folders[layout]))
    ours = CLIPTokenizer.from_pretrained(folders[layout])
    assert ours.model_max_length == ref.model_max_length == 77
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        ref.bos_token_id,
        ref.eos_token_id,
        ref.pad_token_id,
    )
    prompts = _prompts()
    expected = ref(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    got = ours(prompts)
    assert got.dtype == np.int32 and got.shape == (len(prompts), 77)
    bad = [
        (p, e[:12], g[:12].tolist())
        for p, e, g in zip(prompts, expected, got, strict=True)
        if list(e) != g.tolist()
    ]
    assert not bad, bad[:3]


def test_pad_conventions(folders):
    sd15 = CLIPTokenizer.from_pretrained(folders["sd15"])
    sdxl2 = CLIPTokenizer.from_pretrained(folders["sdxl2"])
    assert sd15.pad_token_id == sd15.eos_token_id
    assert sdxl2.pad_token == "!" and sdxl2.pad_token_id == 0
    for tok in (sd15, sdxl2):
        ids = tok("a cat")[0].tolist()
        end = ids.index(tok.eos_token_id)
        assert ids[end + 1 :] == [tok.pad_token_id] * (76 - end)
    # "!" in the text is the pad token itself for tokenizer_2, a BPE symbol "!</w>" otherwise.
    last = {}
    for name, tok in (("sd15", sd15), ("sdxl2", sdxl2)):
        ids = tok("wow!")[0].tolist()
        last[name] = ids[ids.index(tok.eos_token_id) - 1]
    assert last == {"sd15": sd15.vocab["!</w>"], "sdxl2": 0}


@pytest.mark.parametrize("layout", ["sd15", "sdxl2"])
def test_truncation_warns_with_dropped_count(folders, layout):
    ref = transformers.CLIPTokenizer.from_pretrained(str(folders[layout]))
    ours = CLIPTokenizer.from_pretrained(folders[layout])
    long = "a photo of an astronaut riding a horse on mars, " * 12 + "the very end"
    n_full = len(ref(long)["input_ids"])
    assert n_full > 77
    expected = ref(long, padding="max_length", max_length=77, truncation=True)["input_ids"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours([long, "short"])
    assert got[0].tolist() == expected and got[0, -1] == ours.eos_token_id
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"{n_full - 77} token(s) dropped" in message and "the very end" in message


def test_max_length_argument(folders):
    ref = transformers.CLIPTokenizer.from_pretrained(str(folders["sdxl2"]))
    ours = CLIPTokenizer.from_pretrained(folders["sdxl2"])
    prompt = "a red bottle of wine on a wooden table"
    expected = ref(prompt, padding="max_length", max_length=8, truncation=True)["input_ids"]
    with pytest.warns(UserWarning, match="dropped"):
        assert ours(prompt, max_length=8)[0].tolist() == expected


def test_decode_matches_transformers(folders):
    ref = transformers.CLIPTokenizer.from_pretrained(str(folders["plain"]))
    ours = CLIPTokenizer.from_pretrained(folders["plain"])
    for text in ["a photo of an astronaut riding a horse", "café naïve 日本 🙂 4k"]:
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids) == ref.decode(ids)


def test_added_token_strip_flags_match_transformers(folders, tmp_path):
    """An extra added token with lstrip/rstrip eats the spaces around it, as in tokenizers."""
    src = folders["plain"]
    vocab = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
    config = {
        "model_max_length": 77,
        "tokenizer_class": "CLIPTokenizer",
        "added_tokens_decoder": {
            str(len(vocab)): _token("<art>", False, lstrip=True, rstrip=True, special=False),
            str(len(vocab) + 1): _token("<Sty>", True, special=False),
        },
    }
    merges = [
        tuple(line.split(" "))
        for line in (src / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ]
    folder = _write(
        tmp_path / "extra",
        list(vocab),
        merges,
        config,
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS},
    )
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ours = CLIPTokenizer.from_pretrained(folder)
    for text in ["a  <art>  cat", "x<art>y <ART> <sty> <Sty>", "<art>"]:
        expected = ref(text, padding="max_length", max_length=77, truncation=True)["input_ids"]
        assert ours(text)[0].tolist() == expected, text


def test_bad_merges_file_names_the_line(folders, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in ("vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((folders["plain"] / name).read_bytes())
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nthree parts here\n")
    with pytest.raises(ValueError, match=r"merges.txt:3"):
        CLIPTokenizer.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_bpe_merge_order_on_arbitrary_merges(tmp_path):
    """Random, non-learnt merges over 5 letters (chains, overlaps, repeats) stress the merge
    order: lowest rank first, leftmost first among equal ranks, as the tokenizers heap does."""
    rng = random.Random(1)
    b2u = _bytes_to_unicode()
    vocab = list(b2u.values()) + [c + "</w>" for c in b2u.values()]
    symbols = list("abcde") + [c + "</w>" for c in "abcde"]
    merges = []
    for _ in range(300):
        a, b = rng.choice(symbols), rng.choice(symbols)
        if a.endswith("</w>") or (a, b) in merges:
            continue
        merges.append((a, b))
        if a + b not in vocab:
            vocab.append(a + b)
            symbols.append(a + b)
    folder = _write(tmp_path / "random", vocab + [BOS, EOS], merges, {"model_max_length": 77}, {})
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    ours = CLIPTokenizer.from_pretrained(folder)
    words = ["".join(rng.choice("abcde") for _ in range(rng.randint(1, 12))) for _ in range(1000)]
    bad = [w for w in words if ours.encode(w) != ref(w, add_special_tokens=False)["input_ids"]]
    assert not bad, bad[:5]


def test_tokenizer_json_only_folder_matches_transformers(tmp_path):
    """transformers 5 saves tokenizer.json alone (no vocab.json / merges.txt): read that too."""
    from tests.tiny_models import write_clip_tokenizer

    write_clip_tokenizer(tmp_path / "src", pad_token="!")
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "src", model_max_length=77)
    ref.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved" / "vocab.json").exists()
    ours = CLIPTokenizer.from_pretrained(tmp_path / "saved")
    prompts = ["a red circle, top left!", "The CAT's hat isn't blue;  4k <|endoftext|> x"]
    want = ref(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ours(prompts), np.asarray(want))
