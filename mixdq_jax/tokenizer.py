"""CLIP BPE tokenizer in pure Python, matching transformers 5 ``CLIPTokenizer`` id for id.

The pipeline needs token ids without importing transformers or ``tokenizers`` at run time, so this
re-implements what transformers 5 builds from a standard tokenizer folder (``vocab.json``,
``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``):

1. added tokens (bos/eos/unk/pad and ``added_tokens_decoder``) are cut out of the raw text first
   (``normalized: false``) or out of each normalized piece (``normalized: true``);
2. the rest is normalized: NFC, every whitespace run to one space, lowercase char by char (no
   final-sigma rule, like the Rust normalizer);
3. pre-tokenized with the CLIP regex, then the GPT-2 regex of the byte-level step, and mapped
   byte by byte to printable unicode;
4. each word goes through BPE with ``</w>`` on its last symbol, always merging the lowest-ranked
   pair, leftmost first (the order of the ``tokenizers`` heap);
5. ``bos + ids[: max_length - 2] + eos`` padded with the pad token, as diffusers calls it
   (``padding="max_length", truncation=True``).

Unlike the original OpenAI tokenizer, transformers 5 applies no ftfy / html unescape; neither do we.
"""

from __future__ import annotations

import functools
import json
import unicodedata
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex

_CLIP_SPLIT = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The byte-level pre-tokenizer splits again with the GPT-2 pattern (a no-op on CLIP pieces except
# the literal "<|startoftext|>" strings, which it cuts into "<|", "startoftext", "|>").
_GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_WHITESPACE = regex.compile(r"\s+")
_END_OF_WORD = "</w>"
_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
_DEFAULT_MAX_LENGTH = 77


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (no whitespace/control chars)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@dataclass(frozen=True)
class _AddedToken:
    content: str
    normalized: bool
    lstrip: bool = False
    rstrip: bool = False


def _normalize(text: str) -> str:
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)  # per char: the Rust normalizer has no final sigma


class CLIPTokenizer:
    """Byte-level BPE tokenizer of CLIP; ``__call__`` gives padded int32 ids ``[B, max_length]``."""

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str = "<|startoftext|>",
        eos_token: str = "<|endoftext|>",
        unk_token: str = "<|endoftext|>",
        pad_token: str = "<|endoftext|>",
        added_tokens: list[_AddedToken] | None = None,
        added_ids: dict[str, int] | None = None,
        model_max_length: int = _DEFAULT_MAX_LENGTH,
    ):
        self.vocab = dict(vocab)
        self._ids_to_tokens = {i: t for t, i in self.vocab.items()}
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, (a, b) in enumerate(merges):
            for part in (a, b, a + b):
                if part not in self.vocab:
                    raise ValueError(f"merge {rank} ({a!r} {b!r}): {part!r} is not in the vocab")
            self._ranks.setdefault((a, b), rank)  # a repeated merge keeps its first rank
        self.model_max_length = int(model_max_length)
        if added_tokens is None:  # plain construction: the four special tokens, not normalized
            added_tokens = [
                _AddedToken(t, normalized=False)
                for t in (bos_token, eos_token, unk_token, pad_token)
            ]
        self._added: dict[str, _AddedToken] = {}
        for tok in added_tokens:  # later entries win, as in the tokenizers added vocabulary
            self._added[tok.content] = tok
        self._added_ids = dict(added_ids or {})
        for content in self._added:
            if content not in self.vocab and content not in self._added_ids:
                self._added_ids[content] = len(self.vocab) + len(self._added_ids)
        self._ids_to_tokens.update({i: t for t, i in self._added_ids.items()})
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        self.bos_token_id = self._token_id(bos_token)
        self.eos_token_id = self._token_id(eos_token)
        self.pad_token_id = self._token_id(pad_token)
        self.unk_token_id = self.vocab.get(unk_token)  # unknown chars need the base-vocab id
        self._raw_split = self._added_pattern(normalized=False)
        self._norm_split = self._added_pattern(normalized=True)
        self._b2u = _byte_to_unicode()
        self._u2b = {u: b for b, u in self._b2u.items()}
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)

    # ----------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPTokenizer:
        """Load a diffusers/transformers ``tokenizer`` folder.

        Reads vocab.json + merges.txt (the layout of released SD/SDXL checkpoints) or, when
        those are absent, the ``tokenizer.json`` that transformers 5 writes instead.
        """
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json")
            merges = _read_merges(folder / "merges.txt")
        elif (folder / "tokenizer.json").is_file():
            vocab, merges, added_tokens = _read_tokenizer_json(folder / "tokenizer.json")
            if "added_tokens_decoder" not in config and added_tokens:
                config = {**config, "added_tokens_decoder": added_tokens}
        else:
            raise FileNotFoundError(
                f"{folder}: no tokenizer files (need vocab.json + merges.txt, or tokenizer.json)"
            )
        specials, added, added_ids = _special_tokens(config, folder)
        max_length = config.get("model_max_length", _DEFAULT_MAX_LENGTH)
        if not isinstance(max_length, int) or max_length > 10**6:  # "unset" in transformers
            max_length = _DEFAULT_MAX_LENGTH
        return cls(
            vocab,
            merges,
            added_tokens=added,
            added_ids=added_ids,
            model_max_length=max_length,
            **specials,
        )

    # ----------------------------------------------------------------------------- encoding

    def _token_id(self, token: str) -> int:
        if token in self.vocab:
            return self.vocab[token]
        if token in self._added_ids:
            return self._added_ids[token]
        raise ValueError(f"special token {token!r} is neither in vocab.json nor an added token")

    def _added_pattern(self, *, normalized: bool) -> tuple[regex.Pattern, list[str]] | None:
        """One regex over the added tokens (capture group i = token i) and their contents.

        Normalized tokens are matched in normalized text, so their own text is normalized too.
        """
        tokens = [t for t in self._added.values() if t.normalized == normalized]
        if not tokens:
            return None
        text = {t.content: _normalize(t.content) if normalized else t.content for t in tokens}
        tokens.sort(key=lambda t: -len(text[t.content]))  # longest first: leftmost-longest
        parts = [
            ("\\s*" if t.lstrip else "")
            + f"({regex.escape(text[t.content])})"
            + ("\\s*" if t.rstrip else "")
            for t in tokens
        ]
        pattern = regex.compile("|".join(f"(?:{p})" for p in parts))
        return pattern, [t.content for t in tokens]

    def _split_added(self, text: str, splitter: tuple[regex.Pattern, list[str]] | None):
        """Yield ``(piece, is_added)``; an added-token match is yielded as the token's content."""
        if splitter is None:
            yield text, False
            return
        pattern, contents = splitter
        start = 0
        for m in pattern.finditer(text):
            if m.start() > start:
                yield text[start : m.start()], False
            yield contents[m.lastindex - 1], True
            start = m.end()
        if start < len(text):
            yield text[start:], False

    def _bpe_uncached(self, word: str) -> tuple[int, ...]:
        symbols = list(word)
        symbols[-1] += _END_OF_WORD
        while len(symbols) > 1:
            best = None
            for i, pair in enumerate(zip(symbols, symbols[1:], strict=False)):
                rank = self._ranks.get(pair)
                if rank is not None and (best is None or rank < best[0]):
                    best = (rank, i)
            if best is None:
                break
            i = best[1]
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        ids = []
        for s in symbols:
            if s in self.vocab:
                ids.append(self.vocab[s])
            elif self.unk_token_id is not None:
                ids.append(self.unk_token_id)
            else:
                raise ValueError(f"symbol {s!r} is not in the vocab and there is no unk token")
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without bos/eos, padding or truncation."""
        ids: list[int] = []
        for raw, added in self._split_added(text, self._raw_split):
            if added:
                ids.append(self._token_id(raw))
                continue
            for piece, added_n in self._split_added(_normalize(raw), self._norm_split):
                if added_n:
                    ids.append(self._token_id(piece))
                    continue
                for chunk in _CLIP_SPLIT.findall(piece):
                    for word in _GPT2_SPLIT.findall(chunk):
                        ids.extend(self._bpe("".join(self._b2u[b] for b in word.encode())))
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids`` for messages: bytes restored, ``</w>`` read as a space, ends stripped."""
        text = "".join(self._ids_to_tokens[int(i)] for i in ids)
        data = bytearray()
        for ch in text.replace(_END_OF_WORD, " "):
            data.extend([self._u2b[ch]] if ch in self._u2b else ch.encode())
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, prompts: str | list[str], max_length: int | None = None) -> np.ndarray:
        """``int32 [B, max_length]``: bos + ids + eos, padded; truncation warns."""
        if isinstance(prompts, str):
            prompts = [prompts]
        max_length = self.model_max_length if max_length is None else int(max_length)
        if max_length < 2:
            raise ValueError(f"max_length must hold bos and eos, got {max_length}")
        out = np.full((len(prompts), max_length), self.pad_token_id, dtype=np.int32)
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            keep = max_length - 2
            if len(ids) > keep:
                dropped = ids[keep:]
                warnings.warn(
                    f"prompt {row} truncated: CLIP handles {max_length} tokens, {len(dropped)} "
                    f"token(s) dropped: {self.decode(dropped)!r}",
                    stacklevel=2,
                )
                ids = ids[:keep]
            seq = [self.bos_token_id, *ids, self.eos_token_id]
            out[row, : len(seq)] = seq
        return out


def _read_json(path: Path) -> dict:
    """A JSON file (``{}`` when absent), or a ValueError naming a damaged one."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, start=1):
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: a merge line needs exactly two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _read_tokenizer_json(path: Path) -> tuple[dict, list[tuple[str, str]], dict]:
    """(vocab, merges, added tokens as ``added_tokens_decoder``) from a tokenizers file."""
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: expected a BPE model with a vocab, got {model.get('type')!r}")
    if model.get("end_of_word_suffix", _END_OF_WORD) != _END_OF_WORD:
        raise ValueError(f"{path}: not a CLIP tokenizer (end_of_word_suffix is not '</w>')")
    merges = []
    for n, merge in enumerate(model.get("merges", [])):
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2:
            raise ValueError(f"{path}: merge {n} needs exactly two symbols, got {merge!r}")
        merges.append((pair[0], pair[1]))
    added = {}
    for tok in data.get("added_tokens", []):
        fields = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
        added[str(tok["id"])] = {k: tok[k] for k in fields if k in tok}
    return model["vocab"], merges, added


def _token_from(value, *, special_default: bool) -> _AddedToken:
    """An added token from a config value: a string, or an ``AddedToken`` dict."""
    if isinstance(value, str):
        return _AddedToken(value, normalized=False)
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise ValueError(f"cannot read a token from {value!r}")
    if value.get("single_word"):
        raise ValueError(f"added token {value['content']!r}: single_word=True is not supported")
    special = value.get("special", special_default)
    return _AddedToken(
        value["content"],
        normalized=bool(value.get("normalized", not special)),
        lstrip=bool(value.get("lstrip", False)),
        rstrip=bool(value.get("rstrip", False)),
    )


def _special_tokens(config: dict, folder: Path):
    """Special tokens and added tokens as transformers 5 resolves them from the two json files.

    With ``added_tokens_decoder`` in tokenizer_config.json the named tokens refer to its entries
    and special_tokens_map.json is not read; otherwise (legacy files) special_tokens_map.json
    overrides tokenizer_config.json. Strings become non-normalized tokens; a content registered
    twice keeps its last definition (bos, eos, unk, ..., pad order).
    """
    decoder: dict[str, tuple[int, _AddedToken]] = {}
    for idx, value in sorted(
        config.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])
    ):
        tok = _token_from(value, special_default=False)
        decoder[tok.content] = (int(idx), tok)
    named: dict[str, _AddedToken] = {}
    for key in _SPECIAL_KEYS:
        if config.get(key) is not None:
            named[key] = _token_from(config[key], special_default=False)
    if "added_tokens_decoder" not in config:
        for key, value in _read_json(folder / "special_tokens_map.json").items():
            if key in _SPECIAL_KEYS and value is not None:
                named[key] = _token_from(value, special_default=True)
    for key, tok in named.items():
        if tok.content in decoder:
            named[key] = decoder[tok.content][1]
    defaults = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    for key, content in defaults.items():  # CLIPTokenizer's defaults for keys the files lack
        named.setdefault(key, _AddedToken(content, normalized=False))
    added = [tok for _, tok in decoder.values()]
    added += [named[key] for key in _SPECIAL_KEYS if key in named]
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    added += [_token_from(v, special_default=True) for v in extra]
    specials = {key: named[key].content for key in defaults}
    return specials, added, {c: idx for c, (idx, _) in decoder.items()}
