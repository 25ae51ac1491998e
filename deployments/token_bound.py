"""A certain lower bound on a text's token count from its UTF-8 length, without tokenizing it.

Tokenizing a 4 MiB prompt costs seconds of CPU; when the text is so long that no tokenization
could fit it in the model's context, the ingress refuses it from its length alone. That needs a
bound that holds for every text: each token stands for at most `max_bytes` bytes of the text
as the client sent it. It holds when nothing before the model drops or shrinks text and the
model has a token for every byte:

- normalizer: none, Prepend, Replace by something no shorter, or Unicode normal forms (which
  shrink UTF-8 at most 3x: three 3-byte Hangul jamo compose to one 3-byte syllable; a
  fullwidth 3-byte letter becomes 1 byte), counted as 4x to be safe;
- pre-tokenizer: none, ByteLevel, Metaspace, Digits, Punctuation, Split that keeps what it
  splits on, or a Sequence of these (Whitespace and the like drop spaces: no bound);
- model: BPE over bytes (a ByteLevel pre-tokenizer, or `byte_fallback`), so no unknown-token
  id stands for a run of text of any length.

A token's text is at most the longest vocabulary entry in UTF-8 (byte-level entries spell each
byte as one character of at most 2 UTF-8 bytes, so they overstate it). Anything else: no bound,
and the text is tokenized as usual. Imports nothing of ours.
"""

from __future__ import annotations

import json
from typing import Any

UNICODE_FORMS = frozenset({"NFC", "NFD", "NFKC", "NFKD"})
KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits", "Punctuation"})


def _normalizer_shrink(node: dict[str, Any] | None) -> int | None:
    """How many times shorter (UTF-8) the normalizer may make a text, or None: unbounded."""
    if node is None:
        return 1
    kind = node.get("type")
    if kind in UNICODE_FORMS:
        return 4
    if kind == "Prepend":
        return 1
    if kind == "Replace":
        pattern = node.get("pattern", {})
        if "String" in pattern and len(node.get("content", "").encode()) >= len(
            pattern["String"].encode()
        ):
            return 1
        return None
    if kind == "Sequence":
        total = 1
        for part in node.get("normalizers", []):
            shrink = _normalizer_shrink(part)
            if shrink is None:
                return None
            total *= shrink
        return total
    return None


def _keeps_text(node: dict[str, Any] | None) -> bool:
    """Whether the pre-tokenizer passes every byte of the text on."""
    if node is None:
        return True
    kind = node.get("type")
    if kind == "Sequence":
        return all(_keeps_text(part) for part in node.get("pretokenizers", []))
    if kind == "Split":
        return node.get("behavior") != "Removed"
    return kind in KEEPING_PRE_TOKENIZERS


def _has_byte_level(node: dict[str, Any] | None) -> bool:
    if node is None:
        return False
    if node.get("type") == "Sequence":
        return any(_has_byte_level(part) for part in node.get("pretokenizers", []))
    return node.get("type") == "ByteLevel"


def max_bytes_per_token(backend: Any) -> int | None:
    """The most UTF-8 bytes of input text one token of this `tokenizers.Tokenizer` can stand
    for, or None when no such bound is certain (see the module docstring)."""
    spec = json.loads(backend.to_str())
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or not _keeps_text(pre):
        return None
    if not (_has_byte_level(pre) or model.get("byte_fallback")):
        return None
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if shrink is None:
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    return shrink * max(len(token.encode("utf-8")) for token in vocab)


def fewest_tokens(text_bytes: int, bytes_per_token: int | None) -> int:
    """The fewest tokens `text_bytes` bytes of text can be (0 without a bound)."""
    if not bytes_per_token:
        return 0
    return -(-text_bytes // bytes_per_token)
