"""A middleware for Serve's HTTP proxy: no client controls it, and its own errors are OpenAI's.

Serve's proxy answers some requests itself, before any ingress sees them: 429 when every
ingress replica's queue is full (its text names the queue figures), 408 at its request timeout,
503 when the app is unavailable; all as plain text. And it honours two headers from any client:
`x-request-timeout-seconds` (a client's own timeout, or none) and `x-request-disconnect-disabled`
(keep running after the client leaves). This middleware, run inside the proxy, removes those
headers from every request and rewrites the proxy's plain-text errors into OpenAI's error shape
(keeping `Retry-After`, dropping the figures, adding `X-Proxy-Error: 1`). Answers from the
ingress (always JSON) pass as they are. Install it with the proxy's environment variable
(the image sets it)::

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.proxy_middleware:middlewares

Imports only `protocol` (and Starlette): it runs in the proxy process.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.middleware import Middleware

from deployments.protocol import error_body

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]

CONTROL_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
# The proxy's own answers: (type, code, message) by status. Its text is not passed on.
PROXY_ERRORS = {
    408: ("server_error", "timeout", "the request timed out"),
    429: ("rate_limit_error", "queue_full", "the server is busy: every ingress replica's queue "
          "is full; retry after the time in Retry-After"),
    500: ("server_error", "internal_error", "internal error in the HTTP proxy"),
    503: ("server_error", "service_unavailable", "the service is unavailable; retry"),
}
KEPT_HEADERS = frozenset({b"retry-after", b"x-request-id"})
PROXY_ERROR_HEADER = b"x-proxy-error"  # on the answers rewritten here: the ingress never saw them


class OpenAIProxyErrors:
    """ASGI middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["headers"] = [(k, v) for k, v in scope.get("headers", ())
                            if k.lower() not in CONTROL_HEADERS]
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


def _rewritten(start: Message) -> list[Message]:
    """The OpenAI-shaped answer standing for the proxy's plain-text one."""
    status = start["status"]
    err_type, code, text = PROXY_ERRORS[status]
    body = json.dumps(error_body(text, err_type, None, code)).encode()
    headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() in KEPT_HEADERS]
    headers += [(b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()), (PROXY_ERROR_HEADER, b"1")]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False}]


def middlewares() -> list[Middleware]:
    """What Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(OpenAIProxyErrors)]
