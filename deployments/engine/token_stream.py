"""Tokens from an engine thread to the requests' event loops: one wake-up per step, not per token.

The engine thread puts every token a step produced (and every ending) into an `Outbox`; at the
end of the step `Outbox.flush` hands each event loop everything meant for it in ONE
`call_soon_threadsafe`. On the loop, each request's `TokenStream` collects what landed and wakes
its reader, which takes all of it at once: a reader that falls behind gets several steps'
tokens in one batch instead of a queue item per token. Pure Python; no torch, no Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any


class TokenStream:
    """One request's tokens, read on its event loop as batches (`async for batch in stream`).

    Written only on its loop (by `Outbox.flush`'s callback), so it needs no lock. The stream
    ends after the engine's `end` lands: normally, or by raising the engine's error.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._tokens: list[int] = []
        self.logprobs: list[Any] = []  # the logprob entry of every token landed, when given
        self._ended = False
        self._error: BaseException | None = None
        self._wake = asyncio.Event()

    @property
    def ended(self) -> bool:
        """Whether the engine has ended this stream (read on the loop)."""
        return self._ended

    def _land(
        self, tokens: list[int], logprobs: list[Any], end: bool, error: BaseException | None
    ) -> None:
        self._tokens.extend(tokens)
        self.logprobs.extend(logprobs)
        if end:
            self._ended, self._error = True, error
        self._wake.set()

    async def __aiter__(self) -> AsyncIterator[list[int]]:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._tokens = self._tokens, []
            if batch:
                yield batch
            if self._ended and not self._tokens:
                if self._error is not None:
                    raise self._error
                return


class Outbox:
    """What one engine step delivers, grouped per event loop (engine thread only)."""

    def __init__(self) -> None:
        # stream -> [tokens, logprobs, ended, error]; dicts keep insertion order, so streams
        # land in the order the step produced them.
        self._pending: dict[TokenStream, list[Any]] = {}

    def put(self, stream: TokenStream, token: int, logprob: Any = None) -> None:
        """A token, and its logprob entry when the request asks for logprobs."""
        entry = self._entry(stream)
        entry[0].append(token)
        if logprob is not None:
            entry[1].append(logprob)

    def end(self, stream: TokenStream, error: BaseException | None = None) -> None:
        entry = self._entry(stream)
        entry[2], entry[3] = True, error

    def _entry(self, stream: TokenStream) -> list[Any]:
        entry = self._pending.get(stream)
        if entry is None:
            entry = self._pending[stream] = [[], [], False, None]
        return entry

    def flush(self) -> None:
        """Hand every loop its share in one call; a closed loop's requests are gone anyway."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[TokenStream, list[Any]]]] = {}
        for stream, entry in self._pending.items():
            by_loop.setdefault(stream.loop, []).append((stream, entry))
        self._pending = {}
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: its requests are gone
                loop.call_soon_threadsafe(_land_all, items)


def _land_all(items: list[tuple[TokenStream, list[Any]]]) -> None:
    for stream, (tokens, logprobs, end, error) in items:
        stream._land(tokens, logprobs, end, error)
