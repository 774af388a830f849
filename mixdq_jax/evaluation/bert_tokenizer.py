"""BERT's uncased WordPiece tokenizer in pure Python (ImageReward's text side), no transformers.

ImageReward tokenizes prompts with ``bert-base-uncased``'s ``BertTokenizer`` (BLIP's text
encoder), ``padding="max_length", truncation=True, max_length=35``. This follows what that
tokenizer does with ``vocab.txt``:

1. clean: drop NUL, U+FFFD and control characters, every whitespace character becomes a space;
2. put spaces around CJK ideographs;
3. lowercase, then strip accents (NFD, drop combining marks);
4. split on whitespace, then cut every punctuation character out as its own token;
5. WordPiece each token: greedy longest match first, continuations prefixed ``##``; a token
   longer than 100 characters, or one that cannot be covered, becomes ``[UNK]``;
6. ``[CLS] + ids[: max_length - 2] + [SEP]``, padded with ``[PAD]``.

BLIP adds ``[DEC]`` and ``[ENC]`` to the vocabulary; they matter only if a prompt spells them
out literally, which this tokenizer does not special-case.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np

_MAX_WORD_CHARS = 100
_CJK = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)  # fmt: skip


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True  # all non-alphanumeric ASCII, "^$`" included
    return unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK)


class BertTokenizer:
    """Uncased BERT WordPiece; ``__call__`` gives ``(ids, mask)`` int32 ``[B, max_length]``."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = dict(vocab)
        for token in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"):
            if token not in self.vocab:
                raise ValueError(f"BERT vocab has no {token} token")
        self.unk_id, self.cls_id = self.vocab["[UNK]"], self.vocab["[CLS]"]
        self.sep_id, self.pad_id = self.vocab["[SEP]"], self.vocab["[PAD]"]

    @classmethod
    def from_vocab_file(cls, path: str | Path) -> BertTokenizer:
        """``vocab.txt``: one token per line, the line number is its id."""
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls({token.rstrip("\r"): i for i, token in enumerate(lines)})

    def _basic_tokens(self, text: str) -> list[str]:
        chars = []
        for ch in text:
            if ord(ch) in (0, 0xFFFD) or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_cjk(ch):
                chars.extend((" ", ch, " "))
            else:
                chars.append(ch)
        text = unicodedata.normalize("NFD", "".join(chars).lower())
        text = "".join(ch for ch in text if unicodedata.category(ch) != "Mn")
        tokens = []
        for word in text.split():
            current = ""
            for ch in word:
                if _is_punctuation(ch):
                    if current:
                        tokens.append(current)
                    tokens.append(ch)
                    current = ""
                else:
                    current += ch
            if current:
                tokens.append(current)
        return tokens

    def _wordpiece(self, token: str) -> list[int]:
        if len(token) > _MAX_WORD_CHARS:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(token):
            end = len(token)
            while end > start:
                piece = token[start:end] if start == 0 else "##" + token[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk_id]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without [CLS]/[SEP], padding or truncation."""
        return [i for token in self._basic_tokens(text) for i in self._wordpiece(token)]

    def __call__(self, prompts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(prompts), max_length), self.pad_id, np.int32)
        mask = np.zeros(ids.shape, np.int32)
        for row, prompt in enumerate(prompts):
            seq = [self.cls_id, *self.encode(prompt)[: max_length - 2], self.sep_id]
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        return ids, mask
