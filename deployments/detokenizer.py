"""Token ids to text deltas, incrementally, a batch of ids at a time, with stop strings.

Text is released only as whole characters: a token may end inside a multi-byte character, and
text that may be the start of a stop string is held back until it is known not to be. On a
stop, the output ends just before the stop string. Two ways to turn ids into text:

- the fast path (token_bytes.py): each token's bytes from a table, through an incremental
  UTF-8 decoder; for ByteLevel-decoder and decoder-less tokenizers, verified at load;
- the window path (the vLLM way) for every other tokenizer: decode the ids since the last
  released text, and release what the new ids added (two decodes a push, however many ids).

Both give the text `tokenizer.decode(ids, skip_special_tokens=True)` gives. Stops are
independent of how ids are batched: the stop string that completes first ends the text (of two
completing on the same character, the one starting earlier). Torch-free: the ingress runs it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

from deployments.token_bytes import ByteTable, build_byte_table, utf8_stream

logger = logging.getLogger(__name__)
REPLACEMENT = "\ufffd"


class Delta(NamedTuple):
    """What one push released."""

    text: str  # safe to emit now
    stopped: bool  # a stop string completed; `text` ends just before it
    consumed: int  # ids of this push used, through the one that completed the stop (all if none)


class TokenDecoder:
    """How to decode one tokenizer's ids; built once per tokenizer (the table costs ~0.1 s per
    100k tokens), then shared by every request's IncrementalDetokenizer."""

    def __init__(self, tokenizer: Any, use_table: bool = True) -> None:
        """`use_table=False` forces the window path (for comparisons)."""
        self.tokenizer = tokenizer
        self.table: ByteTable | None = build_byte_table(tokenizer) if use_table else None
        logger.info(
            "detokenizing %s through %s",
            type(tokenizer).__name__,
            "its byte table" if self.table else "decode windows",
        )

    def stream(self, stop: Sequence[str] = ()) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, stop)


_decoders: dict[int, tuple[Any, TokenDecoder]] = {}
_decoders_lock = threading.Lock()


def token_decoder(tokenizer: Any) -> TokenDecoder:
    """The TokenDecoder of `tokenizer`, built on first use (a few are kept per process)."""
    with _decoders_lock:
        hit = _decoders.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    decoder = TokenDecoder(tokenizer)
    with _decoders_lock:
        if len(_decoders) >= 8:
            _decoders.pop(next(iter(_decoders)))
        _decoders[id(tokenizer)] = (tokenizer, decoder)  # the reference keeps the id unique
    return decoder


class _ByteStream:
    """Fast path: table bytes through an incremental UTF-8 decoder, token by token."""

    def __init__(self, table: ByteTable) -> None:
        self._table = table
        self._utf8 = utf8_stream()
        self._kept = False  # a token has been kept (decoder-less: separators go between)
        self._ends: list[int] = [0]  # text length after each id of the last feed
        self._last = ""  # the last feed's text

    def feed(self, ids: Sequence[int]) -> str:
        pieces, self._ends, length = [], [0], 0
        for token_id in ids:
            piece = self._table.piece(token_id)
            if piece is not None:
                if self._kept and self._table.separator:
                    piece = self._table.separator + piece
                self._kept = True
                text = self._utf8.decode(piece)
                pieces.append(text)
                length += len(text)
            self._ends.append(length)
        self._last = "".join(pieces)
        return self._last

    def text_through(self, count: int) -> str:
        """Text the first `count` ids of the last feed produced."""
        return self._last[: self._ends[count]]

    def finish(self) -> str:
        return self._utf8.decode(b"", final=True)


class _WindowStream:
    """Window path. Invariant: text of ids[:prefix] is released; decoding ids[prefix:] starts
    with `prefix_text` (ids[prefix:read]'s text, context for the decoder), then `released`
    characters already released; the rest is new."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = self._read = self._released = 0
        # The state the last feed started from (for text_through): ids, prefix, released.
        self._before, self._prefix_text = (0, 0, 0), ""

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def feed(self, ids: Sequence[int]) -> str:
        self._before = (len(self._ids), self._prefix, self._released)
        self._ids.extend(ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        new = full[len(self._prefix_text) + self._released :]
        if len(full) > len(self._prefix_text) and not full.endswith(REPLACEMENT):
            self._prefix, self._read, self._released = self._read, len(self._ids), 0
            return new
        # Ends in an incomplete character (or nothing new): release up to it.
        whole = new.rstrip(REPLACEMENT)
        self._released += len(whole)
        return whole

    def text_through(self, count: int) -> str:
        start, prefix, released = self._before
        text = self._decode(self._ids[prefix : start + count])
        return text[len(self._prefix_text) + released :]

    def finish(self) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        rest, self._released = full[len(prefix_text) + self._released :], 0
        return rest


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the text ends for the stop string that completes first in `text` (of two that
    complete on the same character, the longer); None if none is in `text`."""
    best: tuple[int, int] | None = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best):
            best = (start + len(stop), start)
    return None if best is None else best[1]


def partial_stop_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that begins some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class IncrementalDetokenizer:
    """One request's text: `push` ids as they come, `flush` at the end.

    `source` is a TokenDecoder or a tokenizer (its TokenDecoder is then built once and kept).
    """

    def __init__(self, source: Any, stop: Sequence[str] = (), armed: bool = True) -> None:
        """`armed=False`: stop strings do not count until `armed` is set (min_tokens)."""
        decoder = source if isinstance(source, TokenDecoder) else token_decoder(source)
        self._stream = (
            _ByteStream(decoder.table)
            if decoder.table is not None
            else _WindowStream(decoder.tokenizer)
        )
        self._stop = tuple(s for s in stop if s)
        self._held = ""  # decoded but held back: it may begin a stop string
        self.stopped = False
        self.armed = armed

    def push(self, ids: Sequence[int]) -> Delta:
        """Add ids; return the text now safe to emit, whether a stop string completed, and
        how many of these ids were used (through the one completing the stop)."""
        if self.stopped or not ids:
            return Delta("", self.stopped, 0)
        held = self._held
        buffer = held + self._stream.feed(ids)
        if not self.armed:  # stop strings do not count yet: release it all
            self._held = ""
            return Delta(buffer, False, len(ids))
        cut = first_stop(buffer, self._stop)
        if cut is None:
            keep = partial_stop_suffix(buffer, self._stop)
            self._held = buffer[len(buffer) - keep :]
            return Delta(buffer[: len(buffer) - keep], False, len(ids))
        self.stopped, self._held = True, ""
        return Delta(buffer[:cut], True, self._completing(ids, held))

    def _completing(self, ids: Sequence[int], held: str) -> int:
        """The fewest ids of the last push whose text (after `held`) holds a stop string."""
        low, high = 0, len(ids)  # invariant: the first `high` ids hold one
        while low < high:
            mid = (low + high) // 2
            if first_stop(held + self._stream.text_through(mid), self._stop) is None:
                low = mid + 1
            else:
                high = mid
        return high

    def flush(self) -> str:
        """The text still held at the end of generation (an incomplete character becomes
        U+FFFD, as decode gives it); it too ends before a stop string, setting `stopped`."""
        if self.stopped:
            return ""
        text, self._held = self._held + self._stream.finish(), ""
        cut = first_stop(text, self._stop)
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text
