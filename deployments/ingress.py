"""OpenAIIngress: the OpenAI-compatible HTTP API (FastAPI through `serve.ingress`) and the
same operations as Python methods for DeploymentHandle callers.

The ingress parses and validates requests (a client's mistake is a 4xx in OpenAI's error shape,
never a 500), resolves the user (``X-User-Id`` header, else the body's ``user``), and calls
LLMReplica with keyword arguments so the router can read ``user_id``. Every response, streamed
or not, carries ``X-Replica-Id``. Never imports torch or rmm.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import AppArgs, parse_app_args
from deployments.identity import resolve_user_id
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_chunk,
    chat_completion,
    completion_chunk,
    error_body,
    model_list,
    new_id,
    text_completion,
)

logger = logging.getLogger("ray.serve")
REPLICA_HEADER = "X-Replica-Id"
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An OpenAI-shaped error with its HTTP status; Python callers receive it as raised."""

    def __init__(self, status: int, message: str, err_type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 replica_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, err_type or ERROR_TYPES.get(status, "server_error"),
                               param, code)
        self.replica_id = replica_id

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries through Ray
        err = self.body["error"]
        return (APIError, (self.status, err["message"], err["type"], err["param"], err["code"],
                           self.replica_id))

    def response(self) -> JSONResponse:
        headers = {REPLICA_HEADER: self.replica_id} if self.replica_id else None
        return JSONResponse(self.body, status_code=self.status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message and the first offending parameter from pydantic errors."""
    parts, first = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return f"invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}", None
        name = ".".join(loc) or "body"
        first = first or (loc[0] if loc else None)
        parts.append(f"{name}: {err['msg']}")
    return "; ".join(parts) or "invalid request", first


app = FastAPI(title="grace-serve", description="OpenAI-compatible LLM API on Ray Serve.")


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(list(exc.errors()))
    return APIError(400, message, param=param).response()


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(exc.status_code, str(exc.detail)).response()


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in ingress")
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error").response()


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


@serve.ingress(app)
class OpenAIIngress:
    """HTTP and Python entry point; forwards work to LLMReplica through its router."""

    def __init__(self, llm: DeploymentHandle, args: AppArgs | dict[str, Any]) -> None:
        self._llm = llm
        self._args = parse_app_args(args)
        self._model = self._args.model.name
        self._timeout_s = self._args.ingress.request_timeout_s
        self._max_model_len: int | None = None

    # ---- the shared path ------------------------------------------------------------------

    def _check_model(self, model: str) -> None:
        if model != self._model:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                           f"'{self._model}'", param="model", code="model_not_found")

    async def _open(self, payload: dict[str, Any], user_id: str | None
                    ) -> tuple[dict[str, Any], AsyncIterator[dict[str, Any]]]:
        """Start a request on a replica; return its first event and the rest of the stream."""
        stream = self._llm.options(stream=True).generate.remote(request=payload, user_id=user_id)
        try:
            first = await asyncio.wait_for(stream.__anext__(), self._timeout_s)
        except asyncio.TimeoutError:
            stream.cancel()
            raise APIError(504, "the request timed out before its first token",
                           "server_error", code="timeout") from None
        except Exception as exc:
            logger.warning("replica call failed before its first token: %r", exc)
            raise APIError(503, "no model replica could serve the request; retry",
                           "server_error", code="replica_unavailable") from exc
        if first["event"] == "error":
            raise APIError(first["status"], first["message"], first["type"], first["param"],
                           first["code"])
        return first, self._until_deadline(stream, time.monotonic() + self._timeout_s)

    async def _until_deadline(self, stream: Any, deadline: float
                              ) -> AsyncIterator[dict[str, Any]]:
        """The stream's events; an error event if it fails or outlives the deadline."""
        finished = False
        try:
            while True:
                try:
                    event = await asyncio.wait_for(
                        stream.__anext__(), max(0.0, deadline - time.monotonic())
                    )
                except StopAsyncIteration:
                    finished = True
                    return
                except asyncio.TimeoutError:
                    yield {"event": "error", "status": 504, "message": "request timed out",
                           "type": "server_error", "param": None, "code": "timeout"}
                    return
                except Exception as exc:
                    logger.warning("replica stream failed: %r", exc)
                    yield {"event": "error", "status": 503,
                           "message": "the model replica failed during generation; retry",
                           "type": "server_error", "param": None, "code": "replica_failed"}
                    return
                yield event
        finally:
            if not finished:
                stream.cancel()  # client gone or deadline: stop the replica's work

    @staticmethod
    async def _collect(first: dict[str, Any], events: AsyncIterator[dict[str, Any]]
                       ) -> tuple[str, str | None, dict[str, Any]]:
        text, finish, usage = [], None, {}
        async for event in events:
            if event["event"] == "delta":
                text.append(event["text"])
            elif event["event"] == "end":
                finish, usage = event["finish_reason"], event["usage"]
            elif event["event"] == "error":
                raise APIError(event["status"], event["message"], event["type"],
                               code=event["code"], replica_id=first["replica_id"])
        return "".join(text), finish, usage

    def _chat_payload(self, req: ChatCompletionRequest) -> dict[str, Any]:
        self._check_model(req.model)
        return {"messages": [{"role": m.role, "content": m.text()} for m in req.messages],
                "sampling": req.sampling(req.token_limit)}

    def _completion_payload(self, req: CompletionRequest) -> dict[str, Any]:
        self._check_model(req.model)
        return {**req.prompt_payload(), "sampling": req.sampling(req.max_tokens)}

    async def _chat_events(self, first: dict[str, Any], events: AsyncIterator[dict[str, Any]],
                           include_usage: bool) -> AsyncIterator[dict[str, Any]]:
        rid = new_id("chatcmpl")
        yield chat_chunk(rid, self._model, {"role": "assistant", "content": ""})
        async for event in events:
            if event["event"] == "delta" and event["text"]:
                yield chat_chunk(rid, self._model, {"content": event["text"]})
            elif event["event"] == "end":
                yield chat_chunk(rid, self._model, {}, event["finish_reason"])
                if include_usage:
                    yield chat_chunk(rid, self._model, None, usage=event["usage"])
            elif event["event"] == "error":
                yield APIError(event["status"], event["message"], event["type"],
                               code=event["code"]).body

    async def _completion_events(self, first: dict[str, Any],
                                 events: AsyncIterator[dict[str, Any]], include_usage: bool
                                 ) -> AsyncIterator[dict[str, Any]]:
        rid = new_id("cmpl")
        async for event in events:
            if event["event"] == "delta" and event["text"]:
                yield completion_chunk(rid, self._model, event["text"])
            elif event["event"] == "end":
                yield completion_chunk(rid, self._model, "", event["finish_reason"])
                if include_usage:
                    yield completion_chunk(rid, self._model, None, usage=event["usage"])
            elif event["event"] == "error":
                yield APIError(event["status"], event["message"], event["type"],
                               code=event["code"]).body

    async def _sse_response(self, first: dict[str, Any],
                            chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            async for chunk in chunks:
                yield _sse(chunk)
            yield _sse("[DONE]")

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={REPLICA_HEADER: first["replica_id"]})

    # ---- HTTP -----------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        if self._max_model_len is None:
            try:
                info = await asyncio.wait_for(self._llm.model_info.remote(), 30)
                self._max_model_len = info["max_model_len"]
            except Exception as exc:  # the list is still right without it
                logger.warning("could not fetch model info: %r", exc)
        return model_list(self._model, self._max_model_len)

    @app.post("/v1/chat/completions")
    async def chat_completions(
        self, body: ChatCompletionRequest,
        x_user_id: str | None = Header(None, alias="X-User-Id", max_length=256),
    ) -> Any:
        user = resolve_user_id(x_user_id, body.user)
        first, events = await self._open(self._chat_payload(body), user)
        if body.stream:
            return await self._sse_response(
                first, self._chat_events(first, events, body.include_usage))
        text, finish, usage = await self._collect(first, events)
        return JSONResponse(chat_completion(new_id("chatcmpl"), self._model, text, finish, usage),
                            headers={REPLICA_HEADER: first["replica_id"]})

    @app.post("/v1/completions")
    async def completions(
        self, body: CompletionRequest,
        x_user_id: str | None = Header(None, alias="X-User-Id", max_length=256),
    ) -> Any:
        user = resolve_user_id(x_user_id, body.user)
        first, events = await self._open(self._completion_payload(body), user)
        if body.stream:
            return await self._sse_response(
                first, self._completion_events(first, events, body.include_usage))
        text, finish, usage = await self._collect(first, events)
        return JSONResponse(text_completion(new_id("cmpl"), self._model, text, finish, usage),
                            headers={REPLICA_HEADER: first["replica_id"]})

    @app.get("/admin/replicas")
    async def admin_replicas(self) -> list[dict[str, Any]]:
        """One object per live replica: memory, KV bytes and resident (hashed) users."""
        response = self._llm.broadcast("replica_info")
        results = await response.results_async(timeout_s=10, return_exceptions=True)
        rows = [r for r in results if isinstance(r, dict)]
        return sorted(rows, key=lambda r: r["replica_id"])

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    # ---- Python API (DeploymentHandle) ----------------------------------------------------

    @staticmethod
    def _validate(model: type, request: dict[str, Any]) -> Any:
        try:
            return model.model_validate(request)
        except ValidationError as exc:
            message, param = validation_message(list(exc.errors()))
            raise APIError(400, message, param=param) from None

    async def chat(self, request: dict[str, Any], user: str | None = None) -> dict[str, Any]:
        """A chat completion, as the HTTP body would be. Raises APIError for bad input."""
        req = self._validate(ChatCompletionRequest, request)
        first, events = await self._open(self._chat_payload(req), resolve_user_id(user, req.user))
        text, finish, usage = await self._collect(first, events)
        return chat_completion(new_id("chatcmpl"), self._model, text, finish, usage)

    async def chat_stream(self, request: dict[str, Any], user: str | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        """Chat completion chunks, as the SSE stream would carry them; call with stream=True."""
        req = self._validate(ChatCompletionRequest, request)
        first, events = await self._open(self._chat_payload(req), resolve_user_id(user, req.user))
        async for chunk in self._chat_events(first, events, include_usage=True):
            yield chunk

    async def completion(self, request: dict[str, Any], user: str | None = None
                         ) -> dict[str, Any]:
        """A text completion, as the HTTP body would be."""
        req = self._validate(CompletionRequest, request)
        first, events = await self._open(self._completion_payload(req),
                                         resolve_user_id(user, req.user))
        text, finish, usage = await self._collect(first, events)
        return text_completion(new_id("cmpl"), self._model, text, finish, usage)

    async def replicas(self) -> list[dict[str, Any]]:
        """The same rows as GET /admin/replicas."""
        return await self.admin_replicas()
