"""Replica messages to OpenAI bodies: collected answers, streamed chunks, server-sent events.

A replica streams messages, each a list of plain dicts (see `replica`): one `start`, `delta`s,
then `end` (with usage), or an `error` event. These helpers turn them into what the OpenAI API
sends, keeping the replica's batching: one message becomes one write to the client (one SSE
frame per chunk, all of a message's frames in one write). Pure functions of their inputs, but
for `until_deadline`, which reads a replica stream; imports only `protocol`, `errors` and
`logprob_format`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import StreamingResponse

from deployments.errors import REPLICA_HEADER, APIError
from deployments.logprob_format import LogprobFormatter
from deployments.protocol import chat_chunk, completion_chunk, new_id

logger = logging.getLogger("ray.serve")
Event = dict[str, Any]
Messages = AsyncIterator[list[Event]]


def _failure(status: int, message: str, code: str) -> dict[str, Any]:
    return {
        "event": "error",
        "status": status,
        "message": message,
        "type": "server_error",
        "param": None,
        "code": code,
    }


async def next_message(stream: Any, timeout_s: float) -> Any:
    """`stream`'s next item, or TimeoutError once `timeout_s` seconds have passed (at once for
    0 or less). Awaited in place: Python 3.11's `asyncio.wait_for` wraps every awaitable in a
    task of its own, one more task and loop wake-up for each replica message."""
    async with asyncio.timeout(max(0.0, timeout_s)):
        return await stream.__anext__()


async def until_deadline(stream: Any, deadline: float, idle_s: float = float("inf")) -> Messages:
    """A replica's stream of messages, ended by an error event if it fails (the replica died),
    outlives `deadline` (monotonic seconds) or sends nothing for `idle_s` seconds (a frozen
    replica). If the consumer stops early (client gone, a stop string) or time runs out, the
    replica call is cancelled.
    """
    finished = False
    try:
        while True:
            left = deadline - time.monotonic()
            try:
                message = await next_message(stream, min(left, idle_s))
            except StopAsyncIteration:
                finished = True
                return
            except asyncio.TimeoutError:
                if idle_s < left:
                    yield [
                        _failure(
                            504,
                            f"the model replica sent nothing for {idle_s:g} s",
                            "stream_stalled",
                        )
                    ]
                else:
                    yield [_failure(504, "request timed out", "timeout")]
                return
            except Exception as exc:
                logger.warning("replica stream failed: %s", type(exc).__name__)
                yield [
                    _failure(
                        503, "the model replica failed during generation; retry", "replica_failed"
                    )
                ]
                return
            yield message
    finally:
        if not finished:
            stream.cancel()  # client gone or deadline: stop the replica's work


def error_from_event(event: dict[str, Any], replica_id: str | None = None) -> APIError:
    return APIError(
        event["status"],
        event["message"],
        event["type"],
        event.get("param"),
        event["code"],
        replica_id=replica_id or event.get("replica_id"),
    )


@dataclass
class Answer:
    """A whole (collected) answer."""

    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    tool_calls: list[dict[str, Any]]  # OpenAI-shaped, in order (tool_choice.py makes them)
    logprobs: list | None = None  # the tokens' logprob entries; None when not asked for


async def collect(first: Event, messages: Messages) -> Answer:
    """The whole answer; raises APIError on an error event."""
    text, calls, finish, usage, entries = [], [], None, {}, None
    async for message in messages:
        for event in message:
            if event["event"] == "delta":
                text.append(event["text"])
                if "logprobs" in event:
                    entries = (entries or []) + event["logprobs"]
            elif event["event"] == "tool_call":
                calls.append(event["call"])
            elif event["event"] == "end":
                finish, usage = event["finish_reason"], event["usage"]
            elif event["event"] == "error":
                raise error_from_event(event, first["replica_id"])
    return Answer("".join(text), finish, usage, calls, entries)


Chunks = AsyncIterator[list[dict[str, Any]]]


async def _chunks(
    messages: Messages,
    include_usage: bool,
    on_error: Callable[[str], None],
    text: Callable[[str, list | None], dict],
    end: Callable[[str], dict],
    usage: Callable[[dict], dict],
    call: Callable[[Event], list[dict]] | None = None,
) -> Chunks:
    """Each replica message as the API chunks built by `text` (from text and logprob
    entries), `end`, `usage` and `call` (for `tool_call` events); an error after the first
    token becomes an error chunk (and is
    reported to `on_error`)."""
    async for message in messages:
        chunks = []
        for event in message:
            if event["event"] == "delta" and (event["text"] or event.get("logprobs")):
                chunks.append(text(event["text"], event.get("logprobs")))
            elif event["event"] == "tool_call" and call is not None:
                chunks.extend(call(event))
            elif event["event"] == "end":
                chunks.append(end(event["finish_reason"]))
                if include_usage:
                    chunks.append(usage(event["usage"]))
            elif event["event"] == "error":
                err = error_from_event(event)
                on_error(err.reason)
                chunks.append(err.body)
        if chunks:
            yield chunks


async def chat_events(
    model: str,
    messages: Messages,
    include_usage: bool,
    on_error: Callable[[str], None],
    logprobs: LogprobFormatter | None = None,
) -> Chunks:
    """Chat completion chunks, a list per replica message, opening with the assistant's role;
    each chunk's tokens' logprobs with it (formatted by `logprobs`)."""
    rid = new_id("chatcmpl")
    yield [chat_chunk(rid, model, {"role": "assistant", "content": ""})]

    def text(t: str, entries: list | None) -> dict:
        lp = logprobs.chat(entries) if logprobs is not None and entries is not None else None
        return chat_chunk(rid, model, {"content": t}, logprobs=lp)

    async for chunks in _chunks(
        messages,
        include_usage,
        on_error,
        text=text,
        end=lambda reason: chat_chunk(rid, model, {}, reason),
        usage=lambda u: chat_chunk(rid, model, None, usage=u),
        call=lambda e: [chat_chunk(rid, model, delta) for delta in tool_call_deltas(e)],
    ):
        yield chunks


def tool_call_deltas(event: Event) -> list[dict[str, Any]]:
    """A call as OpenAI streams it: its id, type and name with empty arguments, then the
    arguments (here in one piece; clients concatenate the pieces they get)."""
    call, index = event["call"], event["index"]
    function = call["function"]
    return [
        {
            "tool_calls": [
                {
                    "index": index,
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": function["name"], "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": index, "function": {"arguments": function["arguments"]}}]},
    ]


async def completion_events(
    model: str,
    messages: Messages,
    include_usage: bool,
    on_error: Callable[[str], None],
    logprobs: LogprobFormatter | None = None,
) -> Chunks:
    """Text completion chunks, a list per replica message (text_offset counts on across
    chunks)."""
    rid = new_id("cmpl")
    offset = 0

    def text(t: str, entries: list | None) -> dict:
        nonlocal offset
        lp = None
        if logprobs is not None and entries is not None:
            lp, offset = logprobs.completion(entries, offset)
        return completion_chunk(rid, model, t, logprobs=lp)

    async for chunks in _chunks(
        messages,
        include_usage,
        on_error,
        text=text,
        end=lambda reason: completion_chunk(rid, model, "", reason),
        usage=lambda u: completion_chunk(rid, model, None, usage=u),
    ):
        yield chunks


TIMING_HEADER = "Server-Timing"


def server_timing(prepare_ms: float, upstream_ms: float, replica_ms: float) -> str:
    """The `Server-Timing` value (W3C) of a response's first token, in milliseconds: the
    ingress's parsing, tokenizing and shaping (`prepare`), its replica call to the first
    message (`upstream`), and the part of that spent in the replica (`replica`: admission, the
    engine's queue, prefill); upstream - replica is the transport."""
    return (
        f"prepare;dur={prepare_ms:.2f}, upstream;dur={upstream_ms:.2f}, "
        f"replica;dur={replica_ms:.2f}"
    )


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def sse_response(start: Event, chunks: Chunks) -> StreamingResponse:
    """Server-sent events ending with `[DONE]`, naming the replica that serves them (and the
    first token's timing): one write per replica message."""

    async def body() -> AsyncIterator[str]:
        async for batch in chunks:
            yield "".join(sse(chunk) for chunk in batch)
        yield sse("[DONE]")

    return StreamingResponse(
        body(), media_type="text/event-stream", headers=response_headers(start)
    )


def response_headers(start: Event) -> dict[str, str]:
    """X-Replica-Id, and Server-Timing when the ingress timed the request."""
    headers = {REPLICA_HEADER: start["replica_id"]}
    if start.get("server_timing"):
        headers[TIMING_HEADER] = start["server_timing"]
    return headers
