"""A small CLIP BPE vocabulary for the testbed captions, saved in the standard tokenizer files.

CLIP's byte alphabet (so any text encodes) plus merges learnt from the caption grammar's words
until every word is a single token; both SDXL tokenizers use it (``tokenizer_2`` pads with "!",
as SDXL's does).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from mixdq_jax.io_utils import atomic_write_text
from mixdq_jax.testbed.data import vocabulary_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """CLIP's printable stand-in for each byte (the byte-level BPE alphabet), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    extra = 0
    table = {}
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # CLIP's vocab lists the printable bytes first, then the remapped ones.
    chars = [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]
    return chars


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges (most frequent pair first, ties by the larger pair) until every word is one
    symbol."""
    splits = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: collections.Counter = collections.Counter()
        for parts in splits.values():
            for a, b in zip(parts, parts[1:], strict=False):
                pairs[a, b] += 1
        if not pairs:
            return merges
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append((a, b))
        for w, parts in splits.items():
            out, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out


def write_tokenizer(
    folder: str | Path, *, pad_token: str = EOS, words: list[str] | None = None
) -> dict[str, int]:
    """Write vocab.json, merges.txt and the token configs for ``words`` (default: the testbed
    grammar's words); returns the special-token ids and the vocabulary size."""
    folder = Path(folder)
    alphabet = _bytes_to_unicode()
    merges = learn_merges(vocabulary_words() if words is None else words)
    vocab = alphabet + [c + "</w>" for c in alphabet]
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            vocab.append(a + b)
            seen.add(a + b)
    vocab += [BOS, EOS]
    ids = {t: i for i, t in enumerate(vocab)}
    atomic_write_text(folder / "vocab.json", json.dumps(ids, ensure_ascii=False))
    atomic_write_text(
        folder / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    atomic_write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2))
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
              "do_lower_case": True, **special}  # fmt: skip
    atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    return {"vocab_size": len(vocab), "bos": ids[BOS], "eos": ids[EOS], "pad": ids[pad_token]}
