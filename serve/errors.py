"""OpenAI-shaped error bodies: `{"error": {"message", "type", "param", "code"}}`, one per status."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("jpaged.serve")
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|.*\[.*\])$")

# status -> OpenAI's error `type` for it
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ErrorResponse(JSONResponse):
    """An error body as ASCII JSON, so any text a message quotes renders (lone surrogates too)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class APIError(Exception):
    """An error the client sees as `status` with an OpenAI error body; raised anywhere in a route."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    def response(self) -> JSONResponse:
        return ErrorResponse(self.body(), status_code=self.status)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON body OpenAI's API returns for an error."""
    error_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def param_of(message: str, fields: set[str]) -> str | None:
    """The request field an engine ValueError names: its first word when that is a field."""
    first = message.split(" ", 1)[0].strip(":'\"")
    return first if first in fields else None


def _validation_error(exc: RequestValidationError) -> APIError:
    """Pydantic's first complaint as a 400 naming the top-level field (never FastAPI's 422)."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request body")
    err = errors[0]
    # drop "body" and the union-member tags pydantic puts in locations ("str", "list[int]")
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _UNION_TAG.match(str(p))]
    msg = str(err.get("msg", "invalid value"))
    if err.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {msg}")
    if not loc:
        return bad_request(f"request body: {msg}")
    return bad_request(f"{'.'.join(loc)}: {msg}", param=loc[0])


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves the server as an OpenAI error body; unexpected ones as a logged 500."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return ErrorResponse(
            error_body(exc.status_code, str(exc.detail), None, code),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error", exc_info=exc)
        return ErrorResponse(
            error_body(500, f"internal server error: {type(exc).__name__}: {exc}"),
            status_code=500,
        )
