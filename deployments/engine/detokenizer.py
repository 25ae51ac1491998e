"""Token ids to text deltas, incrementally, with stop strings.

Decoding one token at a time breaks multi-byte characters and merges, so each step decodes a
short window (the vLLM way) and holds text back while it ends in an incomplete character.
Text that could be the start of a stop string is also held back until it is known not to be;
on a stop, the output ends just before the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: tokens before it are already emitted text
        self._read_offset = 0  # tokens before it have produced text
        self._held = ""  # emitted by decoding but held back (possible stop-string start)
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _new_text(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return full[len(prefix) :]
        return ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add one token; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        self._ids.append(token_id)
        buffer = self._held + self._new_text()
        if not self._stop:
            self._held = ""
            return buffer, False
        hits = [i for i in (buffer.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[: min(hits)], True
        keep = self._partial_stop_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """Text held back at the end of generation (no stop string followed it)."""
        if self.stopped:
            return ""
        # The window may end in an incomplete character: emit whatever decoding gives now.
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        rest = self._held + full[len(prefix) :]
        self._held = ""
        self._prefix_offset = self._read_offset = len(self._ids)
        return rest
