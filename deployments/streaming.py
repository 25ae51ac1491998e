"""Replica events to OpenAI bodies: collected answers, streamed chunks, server-sent events.

A replica streams plain dicts (see `replica`): one `start`, `delta`s, then `end` (with usage),
or an `error` event. These helpers turn them into what the OpenAI API sends. Pure functions of
their inputs, but for `until_deadline`, which reads a replica stream; imports only `protocol`
and `errors`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from deployments.errors import REPLICA_HEADER, APIError
from deployments.protocol import chat_chunk, completion_chunk, new_id

logger = logging.getLogger("ray.serve")
Events = AsyncIterator[dict[str, Any]]


def _failure(status: int, message: str, code: str) -> dict[str, Any]:
    return {"event": "error", "status": status, "message": message, "type": "server_error",
            "param": None, "code": code}


async def until_deadline(stream: Any, deadline: float,
                         on_end: Callable[[int], None]) -> Events:
    """A replica's stream of events, ended by an error event if it fails (the replica died)
    or outlives `deadline` (monotonic seconds). `on_end(completion_tokens)` sees a normal end.
    If the consumer stops early (client gone) or time runs out, the replica call is cancelled.
    """
    finished = False
    try:
        while True:
            try:
                event = await asyncio.wait_for(stream.__anext__(),
                                               max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                finished = True
                return
            except asyncio.TimeoutError:
                yield _failure(504, "request timed out", "timeout")
                return
            except Exception as exc:
                logger.warning("replica stream failed: %s", type(exc).__name__)
                yield _failure(503, "the model replica failed during generation; retry",
                               "replica_failed")
                return
            if event["event"] == "end":
                on_end(event["usage"]["completion_tokens"])
            yield event
    finally:
        if not finished:
            stream.cancel()  # client gone or deadline: stop the replica's work


def error_from_event(event: dict[str, Any], replica_id: str | None = None) -> APIError:
    return APIError(event["status"], event["message"], event["type"], event.get("param"),
                    event["code"], replica_id=replica_id or event.get("replica_id"))


async def collect(first: dict[str, Any], events: Events) -> tuple[str, str | None, dict]:
    """The whole answer: text, finish reason and usage; raises APIError on an error event."""
    text, finish, usage = [], None, {}
    async for event in events:
        if event["event"] == "delta":
            text.append(event["text"])
        elif event["event"] == "end":
            finish, usage = event["finish_reason"], event["usage"]
        elif event["event"] == "error":
            raise error_from_event(event, first["replica_id"])
    return "".join(text), finish, usage


async def _chunks(events: Events, include_usage: bool, on_error: Callable[[str], None],
                  text: Callable[[str], dict], end: Callable[[str], dict],
                  usage: Callable[[dict], dict]) -> Events:
    """Engine events as API chunks built by `text`, `end` and `usage`; an error after the
    first token becomes an error chunk (and is reported to `on_error`)."""
    async for event in events:
        if event["event"] == "delta" and event["text"]:
            yield text(event["text"])
        elif event["event"] == "end":
            yield end(event["finish_reason"])
            if include_usage:
                yield usage(event["usage"])
        elif event["event"] == "error":
            err = error_from_event(event)
            on_error(err.reason)
            yield err.body


async def chat_events(model: str, events: Events, include_usage: bool,
                      on_error: Callable[[str], None]) -> Events:
    """Chat completion chunks, opening with the assistant's role."""
    rid = new_id("chatcmpl")
    yield chat_chunk(rid, model, {"role": "assistant", "content": ""})
    async for chunk in _chunks(
            events, include_usage, on_error,
            text=lambda t: chat_chunk(rid, model, {"content": t}),
            end=lambda reason: chat_chunk(rid, model, {}, reason),
            usage=lambda u: chat_chunk(rid, model, None, usage=u)):
        yield chunk


async def completion_events(model: str, events: Events, include_usage: bool,
                            on_error: Callable[[str], None]) -> Events:
    """Text completion chunks."""
    rid = new_id("cmpl")
    async for chunk in _chunks(
            events, include_usage, on_error,
            text=lambda t: completion_chunk(rid, model, t),
            end=lambda reason: completion_chunk(rid, model, "", reason),
            usage=lambda u: completion_chunk(rid, model, None, usage=u)):
        yield chunk


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def sse_response(replica_id: str, chunks: Events) -> StreamingResponse:
    """Server-sent events ending with `[DONE]`, naming the replica that serves them."""

    async def body() -> AsyncIterator[str]:
        async for chunk in chunks:
            yield sse(chunk)
        yield sse("[DONE]")

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={REPLICA_HEADER: replica_id})
