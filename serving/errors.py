"""One exception type for every client-visible failure, rendered as OpenAI-style error JSON."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.protocol import error_body

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 408: "timeout_error", 409: "conflict_error", 413: "invalid_request_error",
          429: "rate_limit_error",
          500: "server_error", 502: "server_error", 503: "overloaded_error", 504: "timeout_error"}


class APIError(Exception):
    """An error the client should see, with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type_ or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A one-line message and the first offending field from pydantic errors."""
    parts, first = [], None
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        # Union members show up as extra path parts (e.g. 'str', 'list[TextPart]'): keep the field path.
        loc = [p for p in loc if not (p[:1].islower() and ("[" in p or p in ("str", "int", "float", "bool")))]
        field = ".".join(f"[{p}]" if p.isdigit() else p for p in loc).replace(".[", "[") or "body"
        first = first or field
        message = err.get("msg", "invalid value").removeprefix("Value error, ")
        parts.append(f"{field}: {message}")
    return "; ".join(parts), first


def install_handlers(app) -> None:
    """Make every 4xx/5xx, including framework and unexpected ones, an OpenAI-style error JSON."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint ({message})"
        return APIError(exc.status_code, message, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}").response()
