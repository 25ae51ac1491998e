"""OpenAIIngress: the OpenAI-compatible HTTP API (FastAPI through `serve.ingress`) and the
same operations as Python methods for DeploymentHandle callers.

In front of every route, the `Gate` middleware checks API keys and bounds the body (gate.py).
The ingress parses and validates requests (a client's mistake is a 4xx in OpenAI's error shape,
never a 500), resolves the user (``X-User-Id`` header, else the body's ``user``; with auth on,
namespaced by the caller's key), tokenizes the prompt and shapes the request once (prompts.py:
user key, exact prompt tokens, completion length fitted to the context), and calls LLMReplica
with the token ids and that `shape=` keyword, which the router reads. Replicas stream token
ids; the ingress turns them into text and applies stop strings (text_stream.py). Every
response, streamed or not, carries ``X-Replica-Id``.

Overload and failure: a full LLMReplica queue is a 429 with ``Retry-After``; a replica that
dies before the first token is replaced by another (``ingress.replica_retries``); one that dies
mid-stream ends that stream with an error event; every request has a deadline (504).
Never imports torch or rmm.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from deployments.admin import UNRESPONSIVE_HEADER, replica_rows
from deployments.announce import announce_when_ready
from deployments.auth import HANDLE_PRINCIPAL, load_keys, namespaced_user, user_secret
from deployments.config import AppArgs, parse_app_args
from deployments.detokenizer import token_decoder
from deployments.errors import (
    APIError,
    install_error_handlers,
    validation_error,
)
from deployments.gate import PRINCIPAL_SCOPE_KEY, Gate, GateSettings
from deployments.identity import resolve_user_id
from deployments.logprob_format import LogprobFormatter
from deployments.metrics import IngressMetrics
from deployments.model_files import resolve_model_dir
from deployments.prompts import Prepared, PromptBuilder
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_completion,
    model_list,
    new_id,
    text_completion,
)
from deployments.readiness import Readiness, ReplicaCounts, deployment_counts, not_ready_error
from deployments.serve_logging import wire_serve_logging
from deployments.slots import Readers, Slots
from deployments.streaming import (
    Messages,
    chat_events,
    collect,
    completion_events,
    error_from_event,
    next_message,
    response_headers,
    server_timing,
    sse_response,
    until_deadline,
)
from deployments.text_stream import TextStream, detokenized
from deployments.tokenizer import TextTokenizer
from deployments.tool_calls import ParserName, detect_parser
from deployments.tool_choice import tool_events

logger = logging.getLogger("ray.serve")
RETRY_BACKOFF_S = (0.2, 0.5, 1.0)


async def _prepend(events: list[dict[str, Any]], messages: Messages) -> Messages:
    """`messages`, after a first message of `events` (when there are any)."""
    try:
        if events:
            yield events
        async for message in messages:
            yield message
    finally:
        await messages.aclose()  # type: ignore[attr-defined]  (cancels the replica call)


def _tool_parser(setting: str, tokenizer: TextTokenizer) -> ParserName | None:
    """The configured tool-call format, or the one the chat template teaches (`auto`)."""
    if setting == "none":
        return None
    if setting != "auto":
        return setting  # type: ignore[return-value]  (config's Literal is the parser names)
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return detect_parser(template)


def _count_error(request: Request, err: APIError) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.reject(err.reason)


app = FastAPI(title="grace-serve", description="OpenAI-compatible LLM API on Ray Serve.")
app.add_middleware(Gate)
install_error_handlers(app, _count_error)


@serve.ingress(app)
class OpenAIIngress:
    """HTTP and Python entry point; forwards work to LLMReplica through its router."""

    def __init__(self, llm: DeploymentHandle, args: AppArgs | dict[str, Any]) -> None:
        wire_serve_logging()
        self._llm = llm
        # Streams come back over Serve's gRPC transport (by value): ~3-4x the messages per
        # second of the default object-reference path (measured on 2 cores: 9-11k vs 2-3k).
        # Built once: `handle.generate` makes a new handle (options copied) at every access.
        self._generate = llm.options(method_name="generate", stream=True, _by_reference=False)
        self._args = parse_app_args(args)
        self._model = self._args.model.name
        self._limits = self._args.ingress
        self._keys = load_keys(self._args.auth)
        self._metrics = IngressMetrics()
        self._max_model_len: int | None = None
        model = self._args.model
        tokenizer = TextTokenizer.load(
            resolve_model_dir(model.model_id, model.revision, weights=False)
        )
        self._decoder = token_decoder(tokenizer)  # its byte table, built once
        self._logprobs = LogprobFormatter(self._decoder)
        self._prompts = PromptBuilder(
            tokenizer,
            self._args.engine.default_max_tokens,
            self._limits.max_messages,
            _tool_parser(model.tool_call_parser, tokenizer),
            user_secret(self._args.auth),
        )
        logger.info(
            "OpenAIIngress for %s: auth %s (%d keys)",
            self._model,
            "on" if self._keys.enabled else "off",
            len(self._keys),
        )
        self._readiness = Readiness(self._replica_counts, self._limits.retry_after_s)
        self._announcer = asyncio.get_running_loop().create_task(
            announce_when_ready(self._readiness, llm.app_name, self._model)
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Called by Serve after __init__: hand this replica's settings to the HTTP gate."""
        api: FastAPI = self.app  # type: ignore[attr-defined]  (set by serve.ingress)
        limits = self._limits
        api.state.gate = GateSettings(
            self._keys,
            int(limits.max_body_bytes),
            self._metrics.reject,
            limits.body_timeout_s,
            slots=Slots(limits.request_limit, limits.max_requests_per_key),
            readers=Readers(limits.body_limit),
            retry_after_s=limits.retry_after_s,
        )
        api.state.metrics = self._metrics
        return api

    # ---- the shared path ------------------------------------------------------------------

    async def _replica_counts(self) -> ReplicaCounts:
        return await asyncio.to_thread(
            deployment_counts, self._llm.app_name, self._llm.deployment_name
        )

    def _http_user(self, request: Request, header: str | None, body_user: str | None) -> str | None:
        return namespaced_user(
            request.scope.get(PRINCIPAL_SCOPE_KEY), resolve_user_id(header, body_user)
        )

    def _handle_user(self, user: str | None, body_user: str | None) -> str | None:
        principal = HANDLE_PRINCIPAL if self._keys.enabled else None
        return namespaced_user(principal, resolve_user_id(user, body_user))

    def _check_model(self, model: str) -> None:
        if model != self._model:
            shown = model if len(model) <= 64 else f"{model[:64]}... ({len(model)} characters)"
            raise APIError(
                404,
                f"The model '{shown}' does not exist; this server serves '{self._model}'",
                param="model",
                code="model_not_found",
            )

    def _busy(self) -> APIError:
        return APIError(
            429,
            "the server is busy: every model replica's queue is full; retry "
            "after the time in Retry-After",
            code="queue_full",
            headers={"Retry-After": str(self._limits.retry_after_s)},
        )

    async def _context(self) -> int:
        """The model's context in tokens, as its replicas know it (asked once)."""
        if self._max_model_len is None:
            await self._readiness.require()  # no replica to ask: 503 now, not a 30 s wait
            try:
                info = await asyncio.wait_for(self._llm.model_info.remote(), 30)
            except Exception as exc:
                logger.warning("could not fetch model info: %r", exc)
                raise APIError(
                    503,
                    "no model replica could serve the request; retry",
                    "server_error",
                    code="replica_unavailable",
                ) from None
            self._max_model_len = int(info["max_model_len"])
        return self._max_model_len

    async def _prepare(
        self, req: ChatCompletionRequest | CompletionRequest, user: str | None
    ) -> Prepared:
        self._check_model(req.model)
        context = await self._context()
        if isinstance(req, ChatCompletionRequest):
            return await self._prompts.chat(req, user, context)
        return await self._prompts.completion(req, user, context)

    async def _open(
        self, prepared: Prepared, endpoint: str, arrived: float
    ) -> tuple[dict[str, Any], Messages]:
        """Start a request on a replica; return its `start` event (with the first token's
        `server_timing`) and the rest of the stream as text (its first message already holds
        the first token). `arrived`: when the ingress got the request (monotonic)."""
        called = time.monotonic()
        await self._readiness.require()  # no model replica: 503 now, not a hang
        limits = self._limits
        deadline = arrived + limits.request_timeout_s
        first_by = min(deadline, arrived + limits.first_token_timeout_s)
        stream, first = await self._first_message(prepared, first_by)
        start = first[0]
        if start["event"] == "error":
            raise error_from_event(start)
        first_at = time.monotonic()
        self._readiness.served()
        self._metrics.request_done(endpoint, first_at - arrived, None)
        start = {
            **start,
            "server_timing": server_timing(
                (called - arrived) * 1e3, (first_at - called) * 1e3, start.get("replica_ms", 0.0)
            ),
        }

        def ended(completion_tokens: int) -> None:
            if completion_tokens > 1:
                tpot = (time.monotonic() - first_at) / (completion_tokens - 1)
                self._metrics.request_done(endpoint, None, tpot)

        text = TextStream(self._decoder, start, prepared.stop, prepared.min_tokens)
        tokens = _prepend(first[1:], until_deadline(stream, deadline, limits.stream_idle_timeout_s))
        messages = detokenized(tokens, text, ended)
        if prepared.tools is not None:
            messages = tool_events(messages, prepared.tools)
        return start, messages

    async def _first_message(self, prepared: Prepared, first_by: float) -> tuple[Any, Any]:
        """The replica's stream and its first message (the `start` event, then the first
        token), by `first_by` (monotonic) or a 504; a replica lost before it is retried
        (`replica_retries`), then a 503."""
        for attempt in range(self._limits.replica_retries + 1):
            stream = self._generate.remote(request=prepared.payload, shape=prepared.shape)
            try:
                first = await next_message(stream, first_by - time.monotonic())
                break
            except asyncio.TimeoutError:
                stream.cancel()
                raise APIError(
                    504,
                    "the request timed out before its first token",
                    "server_error",
                    code="timeout",
                ) from None
            except BackPressureError:
                raise self._busy() from None
            except RayActorError as exc:  # the replica died: nothing was sent, so try again
                retry = attempt < self._limits.replica_retries
                logger.warning(
                    "replica lost before the first token (%s): %s",
                    "retrying" if retry else "giving up",
                    type(exc).__name__,
                )
                if not retry:
                    raise APIError(
                        503,
                        "the model replica was lost; retry",
                        "server_error",
                        code="replica_unavailable",
                    ) from None
                await asyncio.sleep(RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)])
            except Exception as exc:
                logger.warning("replica call failed before its first token: %s", type(exc).__name__)
                raise APIError(
                    503,
                    "no model replica could serve the request; retry",
                    "server_error",
                    code="replica_unavailable",
                ) from exc
        return stream, first

    async def _answer(
        self, req: ChatCompletionRequest | CompletionRequest, user: str | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A whole (non-streamed) answer: the replica's `start` event and the OpenAI body."""
        chat, arrived = isinstance(req, ChatCompletionRequest), time.monotonic()
        first, messages = await self._open(
            await self._prepare(req, user), "chat" if chat else "completion", arrived
        )
        answer = await collect(first, messages)
        entries = answer.logprobs
        if chat:
            lp = self._logprobs.chat(entries) if entries is not None else None
            body = chat_completion(
                new_id("chatcmpl"),
                self._model,
                answer.text,
                answer.finish_reason,
                answer.usage,
                answer.tool_calls,
                lp,
            )
        else:
            lp = self._logprobs.completion(entries, 0)[0] if entries is not None else None
            body = text_completion(
                new_id("cmpl"), self._model, answer.text, answer.finish_reason, answer.usage, lp
            )
        return first, body

    async def _respond(
        self, req: ChatCompletionRequest | CompletionRequest, user: str | None
    ) -> Any:
        """The HTTP response: server-sent events or one JSON body."""
        if not req.stream:
            first, body = await self._answer(req, user)
            return JSONResponse(body, headers=response_headers(first))
        chat, arrived = isinstance(req, ChatCompletionRequest), time.monotonic()
        first, messages = await self._open(
            await self._prepare(req, user), "chat" if chat else "completion", arrived
        )
        chunks = chat_events if chat else completion_events
        return sse_response(
            first,
            chunks(self._model, messages, req.include_usage, self._stream_failed, self._logprobs),
        )

    def _stream_failed(self, reason: str) -> None:
        self._metrics.failed_streams.inc(tags={"reason": reason})

    # ---- HTTP -----------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        try:
            context: int | None = await self._context()
        except APIError:  # the list is still right without it
            context = None
        return model_list(self._model, context)

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict[str, Any]:
        """OpenAI's model object for the served name; 404 (not echoing the id) otherwise."""
        if model_id != self._model:
            raise APIError(
                404,
                f"no such model; this server serves '{self._model}'",
                param="model",
                code="model_not_found",
            )
        return (await self.models())["data"][0]

    @app.post("/v1/chat/completions")
    async def chat_completions(
        self,
        body: ChatCompletionRequest,
        request: Request,
        x_user_id: str | None = Header(None, alias="X-User-Id", max_length=256),
    ) -> Any:
        return await self._respond(body, self._http_user(request, x_user_id, body.user))

    @app.post("/v1/completions")
    async def completions(
        self,
        body: CompletionRequest,
        request: Request,
        x_user_id: str | None = Header(None, alias="X-User-Id", max_length=256),
    ) -> Any:
        return await self._respond(body, self._http_user(request, x_user_id, body.user))

    @app.get("/admin/replicas")
    async def admin_replicas(self) -> JSONResponse:
        """One object per replica that answers: memory, KV bytes and resident (hashed)
        users; those that do not are counted in X-Replicas-Unresponsive (admin.py)."""
        rows, missing = await replica_rows(self._llm, "replica_info", self._limits.admin_timeout_s)
        return JSONResponse(rows, headers={UNRESPONSIVE_HEADER: str(missing)})

    @app.post("/admin/replicas/{replica_id}/drain")
    async def admin_drain(self, replica_id: str) -> dict[str, Any]:
        """Drain one model replica: it stops taking new users and moves every idle user's
        cache to the peers with room (README: Cache moves). Answers what moved and stayed."""
        return await self.drain_replica(replica_id)

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        """Liveness of this ingress replica; says nothing about the model (see /ready)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(self) -> Any:
        """200 when at least one model replica can serve, else the 503 chats would get."""
        verdict = await self._readiness.check()
        if not verdict.ready:
            return not_ready_error(verdict, self._limits.retry_after_s).response()
        return {"status": "ready", "model": self._model, "model_replicas": verdict.running}

    # ---- Python API (DeploymentHandle) ----------------------------------------------------

    def _validate(self, model: type, request: dict[str, Any]) -> Any:
        try:
            return model.model_validate(request)
        except ValidationError as exc:
            self._metrics.reject("invalid_request_error")
            raise validation_error(list(exc.errors())) from None

    async def _counted(self, call: Any) -> Any:
        try:
            return await call
        except APIError as err:
            self._metrics.reject(err.reason)
            raise

    async def chat(self, request: dict[str, Any], user: str | None = None) -> dict[str, Any]:
        """A chat completion, as the HTTP body would be. Raises APIError for bad input."""
        req = self._validate(ChatCompletionRequest, request)
        _, body = await self._counted(self._answer(req, self._handle_user(user, req.user)))
        return body

    async def chat_stream(
        self, request: dict[str, Any], user: str | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Chat completion chunks, as the SSE stream would carry them; call with stream=True."""
        req = self._validate(ChatCompletionRequest, request)
        arrived = time.monotonic()
        prepared = await self._counted(self._prepare(req, self._handle_user(user, req.user)))
        _, messages = await self._counted(self._open(prepared, "chat", arrived))
        async for chunks in chat_events(
            self._model, messages, True, self._stream_failed, self._logprobs
        ):
            for chunk in chunks:
                yield chunk

    async def completion(self, request: dict[str, Any], user: str | None = None) -> dict[str, Any]:
        """A text completion, as the HTTP body would be."""
        req = self._validate(CompletionRequest, request)
        _, body = await self._counted(self._answer(req, self._handle_user(user, req.user)))
        return body

    async def drain_replica(self, replica_id: str) -> dict[str, Any]:
        """The same as POST /admin/replicas/{replica_id}/drain; 404 for an unknown replica."""
        rows, _ = await replica_rows(self._llm, "replica_info", self._limits.admin_timeout_s)
        if replica_id not in {row["replica_id"] for row in rows}:
            raise APIError(
                404, f"no model replica {replica_id!r} answers", code="replica_not_found"
            )
        # Routed by our router to that replica alone (router.TARGET_KWARG).
        call = self._llm.options(method_name="drain").remote(target_replica_id=replica_id)
        timeout = 2 * self._args.cache_moves.call_timeout_s + self._limits.admin_timeout_s
        return await asyncio.wait_for(call, timeout)

    async def replicas(self) -> list[dict[str, Any]]:
        """The same rows as GET /admin/replicas."""
        rows, _ = await replica_rows(self._llm, "replica_info", self._limits.admin_timeout_s)
        return rows
