"""A middleware for Serve's HTTP proxy: no client controls it, and its own errors are OpenAI's.

Serve's proxy answers some requests itself, before any ingress sees them: 429 when every
ingress replica's queue is full (its text names the queue figures), 408 at its request timeout,
503 when the app is unavailable; all as plain text. And it honours two headers from any client:
`x-request-timeout-seconds` (a client's own timeout, or none) and `x-request-disconnect-disabled`
(keep running after the client leaves). This middleware, run inside the proxy, removes those
headers from every request and rewrites the proxy's plain-text errors into OpenAI's error shape
(keeping `Retry-After`, dropping the figures, adding `X-Proxy-Error: 1`). Answers from the
ingress (always JSON) pass as they are.

It also reads each request's body whole in the proxy before the request goes on (up to
`BUFFER_LIMIT_BYTES`; a larger one streams on for the ingress's 413), as nginx buffers bodies:
a client that sends half a body and stalls costs the proxy one waiting coroutine and gets an
OpenAI-shaped 408 after `GRACE_SERVE_BODY_TIMEOUT_S` (30 s), and never reaches an ingress
replica. Before, each stalled body was forwarded and held an ingress body slot, and 1,100 of
them reconnecting pushed well-behaved requests out of those slots on a small host.

Install it with the proxy's environment variable (the image sets it)::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy_middleware:middlewares

Imports only `protocol` (and Starlette): it runs in the proxy process.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.middleware import Middleware

from deployments.protocol import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

CONTROL_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
# The proxy's own answers: (type, code, message) by status. Its text is not passed on.
PROXY_ERRORS = {
    408: ("server_error", "timeout", "the request timed out"),
    429: (
        "rate_limit_error",
        "queue_full",
        "the server is busy: every ingress replica's queue "
        "is full; retry after the time in Retry-After",
    ),
    500: ("server_error", "internal_error", "internal error in the HTTP proxy"),
    503: ("server_error", "service_unavailable", "the service is unavailable; retry"),
}
KEPT_HEADERS = frozenset({b"retry-after", b"x-request-id"})
# How a Ray cluster installs this middleware in its proxies: in every Ray process's environment
# (the image, `make run`, the benchmarks and the tests set it).
PROXY_ENV = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.proxy_middleware:middlewares"
}
BODY_TIMEOUT_S = float(os.environ.get("GRACE_SERVE_BODY_TIMEOUT_S", "30"))
BUFFER_LIMIT_BYTES = 16 << 20  # beyond it, the body streams on to the ingress (its 413)
PROXY_ERROR_HEADER = b"x-proxy-error"  # on the answers rewritten here: the ingress never saw them


class OpenAIProxyErrors:
    """ASGI middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["headers"] = [
            (k, v) for k, v in scope.get("headers", ()) if k.lower() not in CONTROL_HEADERS
        ]
        try:
            receive = await buffered(receive, BODY_TIMEOUT_S, BUFFER_LIMIT_BYTES)
        except asyncio.TimeoutError:
            for part in _rewritten(
                {"status": 408, "headers": []},
                f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                "body_timeout",
            ):
                await send(part)
            return
        rewriting: dict[str, Any] | None = None

        async def send_rewritten(message: Message) -> None:
            nonlocal rewriting
            if message["type"] == "http.response.start" and _is_proxy_error(message):
                rewriting = {"start": message}
                return
            if rewriting is not None and message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # the proxy's text: dropped, the whole answer is rewritten below
                for part in _rewritten(rewriting["start"]):
                    await send(part)
                rewriting = None
                return
            await send(message)

        await self.app(scope, receive, send_rewritten)


def _is_proxy_error(start: Message) -> bool:
    if start.get("status") not in PROXY_ERRORS:
        return False
    types = [v for k, v in start.get("headers", ()) if k.lower() == b"content-type"]
    return bool(types) and types[0].startswith(b"text/plain")


async def buffered(
    receive: Callable[[], Awaitable[Message]], timeout_s: float, limit: int
) -> Callable[[], Awaitable[Message]]:
    """A `receive` that gives the request's body as one message, read here within
    `timeout_s` (asyncio.TimeoutError otherwise), then what `receive` gives (the disconnect).
    A body past `limit` bytes is not gathered further: what was read is replayed, then the
    rest streams from `receive` as it comes."""
    parts: list[Message] = []
    size = 0

    async def gather() -> None:
        nonlocal size
        while True:
            message = await receive()
            parts.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            size += len(message.get("body", b""))
            if size > limit:
                return

    await asyncio.wait_for(gather(), timeout_s)
    if (
        parts
        and all(m["type"] == "http.request" for m in parts)
        and not parts[-1].get("more_body", False)
    ):
        parts = [
            {
                "type": "http.request",
                "body": b"".join(m.get("body", b"") for m in parts),
                "more_body": False,
            }
        ]

    async def replay() -> Message:
        return parts.pop(0) if parts else await receive()

    return replay


def _rewritten(start: Message, text: str | None = None, code: str | None = None) -> list[Message]:
    """The OpenAI-shaped answer standing for the proxy's plain-text one."""
    status = start["status"]
    err_type, default_code, default_text = PROXY_ERRORS[status]
    text, code = text or default_text, code or default_code
    body = json.dumps(error_body(text, err_type, None, code)).encode()
    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() in KEPT_HEADERS]
    headers += [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (PROXY_ERROR_HEADER, b"1"),
    ]
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


def middlewares() -> list[Middleware]:
    """What Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(OpenAIProxyErrors)]
