"""OpenAI-shaped errors for the HTTP and Python APIs, and the FastAPI handlers that send them.

A client's mistake is a 4xx naming the problem, never a 500. `APIError` crosses process
boundaries through Ray (it pickles with its status, body and headers). Imports only `protocol`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.protocol import error_body

logger = logging.getLogger("ray.serve")
REPLICA_HEADER = "X-Replica-Id"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An OpenAI-shaped error with its HTTP status; Python callers receive it as raised."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        replica_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(
            message, err_type or ERROR_TYPES.get(status, "server_error"), param, code
        )
        self.replica_id = replica_id
        self.headers = dict(headers or {})

    @property
    def reason(self) -> str:
        """A short label for metrics: the error's code, else its type."""
        err = self.body["error"]
        return str(err["code"] or err["type"])

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries through Ray
        err = self.body["error"]
        return (
            APIError,
            (
                self.status,
                err["message"],
                err["type"],
                err["param"],
                err["code"],
                self.replica_id,
                self.headers,
            ),
        )

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if self.replica_id:
            headers[REPLICA_HEADER] = self.replica_id
        return JSONResponse(self.body, status_code=self.status, headers=headers or None)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message and the first offending parameter from pydantic errors; a
    request-level error names its parameter in its context (`ctx["param"]`)."""
    parts, first = [], None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        ctx = err.get("ctx") or {}
        if err.get("type") == "json_invalid":
            return f"invalid JSON body: {ctx.get('error', err['msg'])}", None
        if not loc and ctx.get("param"):
            first = first or str(ctx["param"])
            parts.append(err["msg"])
            continue
        name = ".".join(loc) or "body"
        first = first or (loc[0] if loc else None)
        parts.append(f"{name}: {err['msg']}")
    return "; ".join(parts) or "invalid request", first


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The 400 for pydantic errors: `unsupported_parameter` when a field is refused."""
    message, param = validation_message(errors)
    code = (
        "unsupported_parameter"
        if any(e.get("type") == "unsupported_parameter" for e in errors)
        else None
    )
    return APIError(400, message, param=param, code=code)


def install_error_handlers(app: FastAPI, on_error: Callable[[Request, APIError], None]) -> None:
    """Send every error in OpenAI's shape; `on_error(request, err)` sees each (for metrics)."""

    def send(request: Request, err: APIError) -> JSONResponse:
        on_error(request, err)
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return send(request, validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return send(request, APIError(exc.status_code, str(exc.detail)))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return send(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in ingress")
        return send(request, APIError(500, f"internal error: {type(exc).__name__}", "server_error"))
