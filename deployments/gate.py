"""The HTTP gate in front of every route: API keys, body size and time, request slots.

An ASGI middleware, so it acts before FastAPI reads or parses anything: a request without a
valid key is refused (401) without its body being read, and `/admin/*` without an admin key
(403). A body over the limit is refused (413) as soon as its `Content-Length` or its bytes so
far exceed the limit, so no client can make the ingress buffer more than `max_body_bytes`. A
body still incomplete `body_timeout_s` after the request began is refused (408), as is the
oldest incomplete body when the pool of `Readers` is full and another request arrives (once
that body is a second old; before, the newcomer gets a 429), so clients that stall cannot keep
others out and a burst of honest ones does not push itself out. With its body whole, a
request beyond the ingress's own request limit or its key's share (slots.py) is refused (429)
at once. Probes
(`OPEN_PATHS`) take no slot. The settings live on the ASGI app's `state.gate` (set by the
ingress once its config is known); the caller's key id is left in the ASGI scope under
`PRINCIPAL_SCOPE_KEY` for the routes to namespace users with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from deployments.auth import KeyRing, bearer_token
from deployments.protocol import error_body
from deployments.slots import Readers, Slots

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PRINCIPAL_SCOPE_KEY = "grace_serve.principal"
# Probes (liveness, readiness) and the API's documentation need no key.
OPEN_PATHS = frozenset(
    {"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
DEFAULT_MAX_BODY_BYTES = 4 << 20
ADMIN_PREFIX = "/admin/"  # with auth on, only admin keys (KeyRing.is_admin) reach these
BUSY_MESSAGES = {
    "ingress_busy": "the server is busy: this ingress replica runs as many requests as it "
    "takes; retry after the time in Retry-After",
    "key_busy": "too many requests in flight for this API key; wait for one to finish or "
    "retry after the time in Retry-After",
    "bodies_busy": "the server is busy: too many request bodies are arriving at once; retry "
    "after the time in Retry-After",
}


@dataclass
class GateSettings:
    """What the gate enforces; `on_reject(reason)` is told of every refusal (metrics)."""

    keys: KeyRing = field(default_factory=KeyRing)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    on_reject: Callable[[str], None] = lambda reason: None
    body_timeout_s: float = 30.0  # from the request's start to its body's last byte
    slots: Slots = field(default_factory=Slots)
    readers: Readers = field(default_factory=Readers)
    retry_after_s: int = 1


def _route_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _authenticate(
    scope: Scope, receive: Receive, send: Send, settings: GateSettings
) -> tuple[bool, str | None]:
    """(True, principal) for a request that may go on: its key's principal (also recorded in
    the scope), None when no keys are configured; (False, None) after refusing a missing or
    wrong key, or a non-admin key on an admin route."""
    if not settings.keys.enabled:
        return True, None
    principal = settings.keys.match(bearer_token(_header(scope, b"authorization")))
    if principal is None:
        settings.on_reject("invalid_api_key")
        await _refuse(
            scope,
            receive,
            send,
            401,
            "invalid_api_key",
            "Incorrect or missing API key: send `Authorization: Bearer "
            "<key>` with a key this server accepts.",
            {"WWW-Authenticate": "Bearer"},
        )
        return False, None
    scope[PRINCIPAL_SCOPE_KEY] = principal
    if _route_path(scope).startswith(ADMIN_PREFIX) and not settings.keys.is_admin(principal):
        settings.on_reject("admin_key_required")
        await _refuse(
            scope,
            receive,
            send,
            403,
            "admin_key_required",
            "this route needs an admin key (auth.admin_keys_env)",
            None,
            "permission_error",
        )
        return False, None
    return True, principal


class Gate:
    """ASGI middleware: authenticate, then bound the body (see module docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = getattr(scope.get("app"), "state", None)
        settings: GateSettings = getattr(state, "gate", None) or GateSettings()
        if _route_path(scope) in OPEN_PATHS:
            await self._pass(scope, receive, send, settings)
            return
        admitted, principal = await _authenticate(scope, receive, send, settings)
        if not admitted:
            return
        body = await self._body(scope, receive, send, settings)
        if body is None:
            return
        refused = settings.slots.take(principal)
        if refused is not None:
            settings.on_reject(refused)
            await _refuse(
                scope,
                receive,
                send,
                429,
                refused,
                BUSY_MESSAGES[refused],
                {"Retry-After": str(settings.retry_after_s)},
                "rate_limit_error",
            )
            return
        try:
            await _until_gone(self.app, scope, body, receive, send)
        finally:
            settings.slots.give_back(principal)

    async def _pass(
        self, scope: Scope, receive: Receive, send: Send, settings: GateSettings
    ) -> None:
        """Hand a probe on, its body (if any) read whole first; it takes no slot."""
        body = await self._body(scope, receive, send, settings)
        if body is not None:
            await _until_gone(self.app, scope, body, receive, send)

    async def _body(
        self, scope: Scope, receive: Receive, send: Send, settings: GateSettings
    ) -> bytes | None:
        """The request's whole body (b"" for methods without one), read as one of the
        `Readers`; None after refusing it."""
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return b""
        entered = settings.readers.enter()
        if entered is None:
            settings.on_reject("bodies_busy")
            await _refuse(
                scope,
                receive,
                send,
                429,
                "bodies_busy",
                BUSY_MESSAGES["bodies_busy"],
                {"Retry-After": str(settings.retry_after_s)},
                "rate_limit_error",
            )
            return None
        token, pushed = entered
        try:
            return await self._read_body(scope, receive, send, settings, pushed)
        finally:
            settings.readers.leave(token)

    @staticmethod
    async def _read_body(
        scope: Scope, receive: Receive, send: Send, settings: GateSettings, pushed: asyncio.Event
    ) -> bytes | None:
        """The whole body, or None after refusing it as too large or too slow (its time ran
        out, or it was the oldest reader when the pool was full: `pushed`)."""
        limit = settings.max_body_bytes
        declared = _header(scope, b"content-length")
        too_large = f"the request body exceeds the limit of {limit} bytes"
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            settings.on_reject("request_too_large")
            await _refuse(scope, receive, send, 413, "request_too_large", too_large)
            return None
        chunks, size = [], 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.body_timeout_s
        while True:
            message = await _receive_unless(receive, pushed, deadline - loop.time())
            if message is None:
                settings.on_reject("request_timeout")
                why = (
                    "the server needed its slot for a newer request"
                    if pushed.is_set()
                    else f"not within {settings.body_timeout_s:g} s"
                )
                await _refuse(
                    scope,
                    receive,
                    send,
                    408,
                    "request_timeout",
                    f"the request body did not arrive: {why}",
                    {"Connection": "close"},
                )
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                settings.on_reject("request_too_large")
                await _refuse(scope, receive, send, 413, "request_too_large", too_large)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


async def _receive_unless(
    receive: Receive, pushed: asyncio.Event, timeout_s: float
) -> Message | None:
    """The client's next message, or None if `pushed` is set or `timeout_s` passes first."""
    if pushed.is_set():
        return None
    message = asyncio.ensure_future(receive())
    stop = asyncio.ensure_future(pushed.wait())
    try:
        done, _ = await asyncio.wait(
            {message, stop}, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        stop.cancel()
    if message in done:
        return message.result()
    message.cancel()
    return None


async def _until_gone(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    scope: Scope,
    body: bytes,
    receive: Receive,
    send: Send,
) -> None:
    """Run `app` on the buffered body, cancelled as soon as the client disconnects.

    The gate alone reads the client's messages after the body, so a gone client cancels every
    request, streamed or not, whatever Serve's proxy was told: it honours a client's
    `x-request-disconnect-disabled: ?1` and would otherwise let a dropped non-streaming request
    generate to its end. The app's own receive gets the body once, then `http.disconnect` when
    the client goes.
    """
    gone = asyncio.Event()
    task = asyncio.ensure_future(app(scope, _replay(body, gone), send))

    async def watch() -> None:
        while True:
            try:
                message = await receive()
            except Exception:  # no more client messages to read: nothing to watch
                return
            if message["type"] == "http.disconnect":
                gone.set()
                task.cancel()
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await task
    except asyncio.CancelledError:
        if not gone.is_set():
            raise  # this request itself was cancelled, not only the app
    finally:
        watcher.cancel()


def _replay(body: bytes, gone: asyncio.Event) -> Receive:
    """A receive that yields the buffered body once, then `http.disconnect` when `gone`."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    return replay


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    err_type: str = "invalid_request_error",
) -> None:
    body = error_body(message, err_type, None, code)
    await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)
