"""An asyncio streaming client of the OpenAI-compatible API on aiohttp, parsing SSE itself.

Every request streams (`stream: true`, `stream_options.include_usage` for exact token counts)
and asks for exactly `max_tokens` (`ignore_eos` and `min_tokens`, vLLM's extensions). Each
read from the socket is timestamped once, and the text of all the SSE events it completed is
one content chunk at that time (several events sent in one write are one delivery to the
user), carrying as many tokens as its text has words (the benchmark model's tokens are one
word each). Imports no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp

from benchmarks.serve.sessions import Call, Reply


class SSEParser:
    """Server-sent events from a byte stream: the `data` of each complete event."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        """Add bytes; return the data of every event they complete (in order)."""
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        *events, self._buffer = self._buffer.split(b"\n\n")
        out = []
        for event in events:
            lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:  # one optional space after the colon belongs to the syntax
                out.append(b"\n".join(x[1:] if x.startswith(b" ") else x for x in lines).decode())
        return out


def parse_server_timing(value: str) -> dict[str, float]:
    """`name;dur=ms, ...` (W3C Server-Timing) as {name: ms}; unparsable parts are skipped."""
    out = {}
    for part in value.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, number = param.strip().partition("=")
            if key == "dur" and name:
                with contextlib.suppress(ValueError):
                    out[name] = float(number)
    return out


def request_body(call: Call, model: str) -> dict[str, Any]:
    """The JSON body of a streamed completion or chat completion."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": call.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": call.sampling.temperature,
        "top_p": call.sampling.top_p,
        "ignore_eos": True,
        "min_tokens": call.max_tokens,
    }
    if call.messages is not None:
        body["messages"] = call.messages
    else:
        body["prompt"] = call.prompt
    return body


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text a completion or chat chunk carries ('' for role, finish and usage chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


class HTTPTransport:
    """Sends Calls to one server through one aiohttp session (connections are reused)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, model: str) -> None:
        self._session, self._url, self._model = session, url.rstrip("/"), model

    async def __call__(self, call: Call) -> Reply:
        path = "/v1/chat/completions" if call.messages is not None else "/v1/completions"
        headers = {"X-User-Id": call.user} if call.user else {}
        reply = Reply(start=time.monotonic())
        try:
            async with self._session.post(
                self._url + path, json=request_body(call, self._model), headers=headers
            ) as response:
                reply.server_timing = parse_server_timing(response.headers.get("Server-Timing", ""))
                if response.status != 200:
                    reply.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                else:
                    await self._read(response, reply)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            reply.error = f"{type(exc).__name__}: {exc}"[:300]
        reply.end = time.monotonic()
        return reply

    @staticmethod
    async def _read(response: aiohttp.ClientResponse, reply: Reply) -> None:
        parser, parts = SSEParser(), []
        async for data in response.content.iter_any():
            at, text = time.monotonic() - reply.start, ""
            for payload in parser.feed(data):
                if payload != "[DONE]":
                    text += HTTPTransport._event(json.loads(payload), reply)
            if text:  # what one read brought is one chunk, however many events held it
                parts.append(text)
                reply.chunk_t.append(at)
                reply.chunk_n.append(len(text.split()))
        reply.text = "".join(parts)

    @staticmethod
    def _event(chunk: dict[str, Any], reply: Reply) -> str:
        """Note an event's error or usage in `reply`; return its text."""
        if "error" in chunk:
            reply.error = f"error event: {chunk['error'].get('message')}"[:300]
            return ""
        usage = chunk.get("usage")
        if usage:
            reply.prompt_tokens = usage["prompt_tokens"]
            reply.completion_tokens = usage["completion_tokens"]
            details = usage.get("prompt_tokens_details") or {}
            reply.cached_tokens = details.get("cached_tokens") or 0
        return chunk_text(chunk)


def new_session() -> aiohttp.ClientSession:
    """A session without a connection limit (aiohttp's default caps it at 100)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
    )
