"""A request's token messages as text messages, on the ingress: detokenizing and stop strings.

Replica messages carry token ids (see replica.py). Here each `delta` event gains the text its
ids add, a message at a time (one detokenizer push per message, however many tokens it holds),
so the rest of the API path (streaming.py) sees text; with logprobs, a delta carries
`[id, logprob, top]` for each token it used (logprob_format.py makes OpenAI's shapes). Stop
strings end a request here: the text stops just before the stop string, an `end` event with
finish_reason "stop" and the usage of the tokens used follows, and the stream ends, which
cancels the replica's call (the engine then ends the request and keeps its user's cache
consistent). Stop strings count only once `min_tokens`
tokens have come, as vLLM counts them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from deployments.detokenizer import IncrementalDetokenizer, TokenDecoder
from deployments.protocol import usage_dict

Event = dict[str, Any]
Messages = AsyncIterator[list[Event]]


class TextStream:
    """One request's detokenizer and token count."""

    def __init__(
        self, decoder: TokenDecoder, start: Event, stop: tuple[str, ...], min_tokens: int
    ) -> None:
        self.detok = IncrementalDetokenizer(decoder, stop, armed=min_tokens == 0)
        self.start = start
        self.min_tokens = min_tokens
        self.count = 0  # tokens used so far
        self.ended = False

    def _push(self, ids: list[int]) -> str:
        """The text `ids` add; counts the ids used (up to a completed stop string)."""
        pieces = []
        if not self.detok.armed:
            early = ids[: max(0, self.min_tokens - self.count)]
            pieces.append(self.detok.push(early).text)
            self.count += len(early)
            ids = ids[len(early) :]
            self.detok.armed = self.count >= self.min_tokens
        if ids:
            delta = self.detok.push(ids)
            pieces.append(delta.text)
            self.count += delta.consumed
        return "".join(pieces)

    def feed(self, message: list[Event]) -> list[Event]:
        """The text form of one replica message (empty once the request has ended)."""
        out: list[Event] = []
        for event in message:
            if self.ended:
                break
            kind = event["event"]
            if kind == "delta":
                before = self.count
                text = self._push(event["token_ids"])
                logprobs = event.get("logprobs")
                if logprobs is not None:  # those of the tokens used: [id, logprob, top]
                    used = zip(event["token_ids"], logprobs[: self.count - before], strict=False)
                    entries = [[tid, lp, top] for tid, (lp, top) in used]
                    out.append({"event": "delta", "text": text, "logprobs": entries})
                elif text:
                    out.append({"event": "delta", "text": text})
                if self.detok.stopped:
                    out.append(self._end("stop", None))
            elif kind == "end":
                text = self.detok.flush()
                if text:
                    out.append({"event": "delta", "text": text})
                reason = "stop" if self.detok.stopped else event["finish_reason"]
                out.append(self._end(reason, event["usage"]))
            else:
                out.append(event)
        return out

    def _end(self, reason: str, usage: dict[str, Any] | None) -> Event:
        self.ended = True
        if usage is None or usage["completion_tokens"] != self.count:
            usage = usage_dict(self.start["prompt_tokens"], self.count, self.start["cached_tokens"])
        return {"event": "end", "finish_reason": reason, "usage": usage}


async def detokenized(
    messages: Messages, stream: TextStream, on_end: Callable[[int], None]
) -> Messages:
    """`messages` with text; ends (closing `messages`) once the request has ended.
    `on_end(completion_tokens)` sees a normal end."""
    try:
        async for message in messages:
            out = stream.feed(message)
            if out:
                yield out
            if stream.ended:
                on_end(stream.count)
                return
    finally:
        await messages.aclose()  # type: ignore[attr-defined]  (cancels the replica call)
