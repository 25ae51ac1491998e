"""Each token's bytes, for decoding token ids without calling the tokenizer.

For a ByteLevel decoder (GPT-2, Llama 3, Qwen and the built-in tokenizer) the text of a token
sequence is the UTF-8 decoding (invalid bytes replaced) of its tokens' bytes joined, special
tokens left out when skipped; for a tokenizer without a decoder it is the tokens joined by
spaces. `build_byte_table` makes that table and checks it against the tokenizer's own `decode`
(every token alone through the backend, and probe sequences through the tokenizer given, which
catches wrappers' rewrites such as transformers' `clean_up_tokenization_spaces`); anything
else, or any disagreement, gives None and callers decode through the tokenizer instead.
"""

from __future__ import annotations

import codecs
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# Text transformers' cleanup rewrites: probes containing it expose a wrapper that cleans up.
CLEANUP_PROBES = ("x .", "x ?", "x !", "x ,", "x ' x", "x n't", "x 'm", "x 's", "x 've", "x 're")


@dataclass(frozen=True)
class ByteTable:
    """Per-id bytes; None for ids decoding skips (special tokens, ids beyond the vocabulary).
    `separator` goes between consecutive kept tokens (b" " without a decoder, else b"")."""

    pieces: tuple[bytes | None, ...]
    separator: bytes

    def piece(self, token_id: int) -> bytes | None:
        return self.pieces[token_id] if 0 <= token_id < len(self.pieces) else None

    def decode(self, ids: Sequence[int]) -> str:
        """The whole text of `ids` (what the tokenizer's decode should give)."""
        kept = [p for p in map(self.piece, ids) if p is not None]
        return self.separator.join(kept).decode("utf-8", errors="replace")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode map, inverted: the character ByteLevel writes for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


def backend_of(tokenizer: Any) -> Any | None:
    """The `tokenizers.Tokenizer` behind a TextTokenizer or transformers fast tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return backend if hasattr(backend, "get_added_tokens_decoder") else None


def _token_strings(backend: Any) -> tuple[list[str | None], set[int]]:
    """Each id's token string (added tokens over the model's) and the special tokens' ids."""
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    size = max([*vocab.values(), *added.keys(), -1]) + 1
    strings: list[str | None] = [None] * size
    for token, index in vocab.items():
        strings[index] = token
    for index, token in added.items():
        strings[index] = token.content
    return strings, {i for i, t in added.items() if t.special}


def _table(backend: Any) -> ByteTable | None:
    kind = type(backend.decoder).__name__ if backend.decoder is not None else None
    if kind not in ("ByteLevel", None):
        return None
    strings, special = _token_strings(backend)
    byte_of = _byte_decoder()
    to_latin1 = str.maketrans({c: chr(b) for c, b in byte_of.items()})  # then 1 char: 1 byte
    mapped_away = str.maketrans(dict.fromkeys(byte_of))  # leaves the chars ByteLevel lacks
    pieces: list[bytes | None] = []
    for index, token in enumerate(strings):
        if token is None or index in special:
            pieces.append(None)
        elif kind is None or token.translate(mapped_away):
            pieces.append(token.encode())  # ByteLevel keeps such tokens' own UTF-8, too
        else:
            pieces.append(token.translate(to_latin1).encode("latin-1"))
    return ByteTable(tuple(pieces), b"" if kind else b" ")


def _probes(backend: Any, table: ByteTable) -> list[list[int]]:
    rng = random.Random(0)
    size = len(table.pieces)
    probes = [[rng.randrange(size + 8) for _ in range(256)] for _ in range(4)]
    specials = [i for i, p in enumerate(table.pieces) if p is None][:64]
    probes.append([x for i in specials for x in (i, rng.randrange(size))])
    for text in CLEANUP_PROBES:
        try:
            probes.append(backend.encode(text, add_special_tokens=False).ids)
        except Exception:  # e.g. a word-level vocabulary without an unknown token
            continue
    return probes


def build_byte_table(tokenizer: Any) -> ByteTable | None:
    """The verified table for `tokenizer`, or None where its decoding is not a byte table."""
    backend = backend_of(tokenizer)
    table = _table(backend) if backend is not None else None
    if table is None:
        return None
    singles = backend.decode_batch(
        [[i] for i in range(len(table.pieces))], skip_special_tokens=True
    )
    for index, text in enumerate(singles):
        if text != table.decode([index]):
            logger.info("byte table disagrees with decode at id %d: %r", index, text)
            return None
    for ids in _probes(backend, table):
        if tokenizer.decode(ids, skip_special_tokens=True) != table.decode(ids):
            logger.info("byte table disagrees with %s.decode on a probe", type(tokenizer).__name__)
            return None
    return table


def utf8_stream() -> codecs.IncrementalDecoder:
    """An incremental UTF-8 decoder replacing invalid bytes as the tokenizers do."""
    return codecs.getincrementaldecoder("utf-8")(errors="replace")
