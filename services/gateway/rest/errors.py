"""The REST API's errors: `ApiError` (an HTTP status, a stable code and a JSON body
`{"error": {"code", "message", "param", "type"}}`), the HTTP form of the flow's errors, and the
exception handlers that answer every error in that form (request validation, unknown paths and
methods included).
"""

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tiermesh.kit.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    RpcError,
    Unavailable,
)

# Seconds a caller should wait before retrying a 503: a replica restarts or sheds load in about that.
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status and a stable code."""

    def __init__(
        self, status: int, code: str, message: str, *, param: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"code": self.code, "message": self.message, "param": self.param, "type": kind}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


RETRY_LATER = {"Retry-After": str(RETRY_AFTER_S)}


def overloaded(message: str, *, param: str | None = None) -> ApiError:
    """503 `overloaded` with `Retry-After`: the gateway or a tier behind it is at its limit."""
    return ApiError(503, "overloaded", message, param=param, headers=RETRY_LATER)


def api_error_from_flow(error: RpcError) -> ApiError:
    """The HTTP form of an error the flow raised."""
    if isinstance(error, InvalidArgument):
        return ApiError(422, "invalid_request", str(error), param=error.field)
    if isinstance(error, DeadlineExceeded):
        return ApiError(504, "upstream_timeout", str(error), param=str(error).split(":", 1)[0])
    if isinstance(error, ResourceExhausted):
        return overloaded(str(error), param=str(error).split(":", 1)[0])
    if isinstance(error, Unavailable):
        hop = str(error).split(":", 1)[0]
        return ApiError(503, "upstream_unavailable", str(error), param=hop, headers=RETRY_LATER)
    if isinstance(error, FailedPrecondition):
        return ApiError(409, "failed_precondition", str(error))
    return ApiError(500, "internal_error", "internal error")


# pydantic names the union member that failed in the location (e.g. "str", "list[str]"); not a field
_UNION_MEMBER = re.compile(r"(str|int|float|bool|none)|\w+\[.*\]|function-.*")


def field_path(location: tuple) -> str:
    """`("body", "messages", 0, "content")` -> `messages[0].content`."""
    field = ""
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, int):
            field += f"[{part}]"
        elif not _UNION_MEMBER.fullmatch(part):
            field += f".{part}" if field else part
    return field


# -- exception handlers ------------------------------------------------------------------------


async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return error.response()


async def _flow_error(_request: Request, error: RpcError) -> JSONResponse:
    return api_error_from_flow(error).response()


async def _invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
    """The first problem pydantic found, named by the field as the caller wrote it."""
    first = error.errors()[0]
    field = field_path(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return ApiError(400, "invalid_json", f"request body: not valid JSON ({first.get('msg')})").response()
    if not field and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        message = "request body: expected a JSON object (send Content-Type: application/json)"
        return ApiError(400, "invalid_json", message).response()
    message = f"{field or 'request body'}: {first.get('msg', 'invalid')}"
    return ApiError(422, "invalid_request", message, param=field or None).response()


async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return ApiError(
        error.status_code, codes.get(error.status_code, "http_error"), str(error.detail)
    ).response()


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error `app` raises as a JSON error body."""
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(RpcError)(_flow_error)
    app.exception_handler(RequestValidationError)(_invalid_request)
    app.exception_handler(StarletteHTTPException)(_http_error)
