"""Returning users' prompts tokenized from where their previous prompt ended.

A returning user sends its whole history again (an OpenAI client resends every message, a
completion client its whole text), and tokenizing an 8k-token history took ~15 ms of the
ingress's time to the first token on the GPU host, more than the rest of the ingress and the
transport together. The kept KV cache already spares the model that history; this spares
the tokenizer: per user, the ingress keeps the text of the last prompt and its token ids, and
when a new prompt extends that text it re-encodes only from a few tokens before the old end.

The cut sits `TAIL` tokens before the end of the kept text, at a token's start, and the
re-encoded tail must reproduce the `OVERLAP` kept tokens that follow the cut (the last few
may merge with the new text, as a word continued by the new text does). Only then are the
kept ids up to the cut and the new tail put together; otherwise, and for new users, the whole
prompt is encoded. Either way the ids decode to the prompt's text. They equal a whole
encoding unless a single pre-token (one "word" of the tokenizer's splitting) longer than the
overlap straddles the cut; tests/cpu/test_prompt_tokens.py compares the two on random
conversations for byte-level BPE tokenizers of the Llama 3 and Qwen families, the built-in
tokenizer and the benchmark's word-level one.

Tokenizers whose post-processor appends tokens after the text (an EOS, a pair template) are
always encoded whole. Memory is bounded by the characters kept (least recently used users
go first). Safe to share between threads.
"""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from deployments.tokenizer import TextTokenizer

TAIL = 16  # tokens before the end of the kept text where re-encoding starts
OVERLAP = 12  # kept tokens after the cut that the re-encoded tail must reproduce
PROBE = "grace serve probe text"


@dataclass(frozen=True)
class _Kept:
    text: str
    ids: array  # array("I"): the prompt's token ids
    starts: tuple[int, ...]  # character offsets in `text` where the last TAIL tokens start


class PromptTokens:
    """Token ids of prompts, reusing each user's last prompt's ids when the new one extends
    it. `encode(None, ...)` (no user) always encodes the whole text and keeps nothing."""

    def __init__(self, tokenizer: TextTokenizer, max_chars: int = 64 << 20) -> None:
        self._tokenizer = tokenizer
        self._max_chars = max_chars
        self._kept: OrderedDict[tuple[str, bool], _Kept] = OrderedDict()
        self._chars = 0
        self._lock = threading.Lock()
        self._appends_nothing = _appends_nothing(tokenizer)
        self.reused = 0  # prompts encoded from a kept prefix
        self.whole = 0  # prompts encoded whole

    def _key(self, user: str | None, add_special_tokens: bool) -> tuple[str, bool] | None:
        """Where a user's last prompt is kept; None: never kept (no user, or a tokenizer that
        appends tokens after the text)."""
        return (user, add_special_tokens) if user is not None and self._appends_nothing else None

    def chars_to_encode(self, user: str | None, text: str, add_special_tokens: bool) -> int:
        """How many characters of `text` `encode` would tokenize now: the tail after the
        kept prefix's cut, else all of it (callers choose a thread by it). Reads the kept
        prompt without touching its recency."""
        key = self._key(user, add_special_tokens)
        with self._lock:
            kept = self._kept.get(key) if key is not None else None
        cut = _cut(kept, text) if kept is not None else None
        return len(text) - (cut or 0)

    def encode(self, user: str | None, text: str, add_special_tokens: bool) -> array:
        """The prompt's token ids as array("I")."""
        key = self._key(user, add_special_tokens)
        kept = self._get(key) if key is not None else None
        found = self._extend(kept, text) if kept is not None else None
        if found is None:
            ids, starts = self._tokenizer.encode_with_starts(text, add_special_tokens, TAIL)
            found = array("I", ids), starts
            self.whole += 1
        else:
            self.reused += 1
        ids, tail_starts = found
        if key is not None and len(ids) > TAIL:
            self._put(key, _Kept(text, ids, tuple(tail_starts)))
        return ids[:]  # the caller's own copy: the kept one is never handed out

    def _extend(self, kept: _Kept, text: str) -> tuple[array, list[int]] | None:
        """Ids of `text` from `kept` and a re-encoded tail, or None where that is not safe."""
        cut = _cut(kept, text)
        if cut is None:
            return None
        keep = len(kept.ids) - TAIL
        tail, starts = self._tokenizer.encode_with_starts(text[cut:], False, TAIL)
        if tail[:OVERLAP] != kept.ids[keep : keep + OVERLAP].tolist():
            return None
        ids = kept.ids[:keep]
        ids.extend(tail)
        return ids, [cut + s for s in starts]

    def _get(self, key: tuple[str, bool]) -> _Kept | None:
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
            return kept

    def _put(self, key: tuple[str, bool], kept: _Kept) -> None:
        with self._lock:
            old = self._kept.pop(key, None)
            self._chars += len(kept.text) - (len(old.text) if old else 0)
            self._kept[key] = kept
            while self._chars > self._max_chars and len(self._kept) > 1:
                _, dropped = self._kept.popitem(last=False)
                self._chars -= len(dropped.text)


def _cut(kept: _Kept, text: str) -> int | None:
    """The character offset in `text` where re-encoding would start from `kept`, or None when
    `text` does not extend the kept text (or too few of its tokens' starts were kept)."""
    if len(kept.starts) < TAIL or not text.startswith(kept.text):
        return None
    return kept.starts[0]


def _appends_nothing(tokenizer: TextTokenizer) -> bool:
    """Whether encoding with special tokens only ever adds tokens before the text."""
    plain, _ = tokenizer.encode_with_starts(PROBE, False, 0)
    special, _ = tokenizer.encode_with_starts(PROBE, True, 0)
    return len(special) >= len(plain) and special[len(special) - len(plain) :] == plain
