"""Helpers shared by the routers: strict body parsing and per-request context."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from serving.errors import APIError, validation_message
from serving.protocol import APIRequest, new_id
from serving.router import OVERRIDE_HEADER, USER_HEADER
from serving.service import Gateway, RequestContext

M = TypeVar("M", bound=BaseModel)


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 before it is buffered: by its Content-Length, or, streamed
    (chunked), as soon as it passes ``serve.max_body_bytes``."""
    limit = gateway(request).cfg.max_body_bytes
    # The connection still carries the unread rest of the body: close it after the 413.
    close = {"Connection": "close"}
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {int(declared)} bytes; the limit is {limit}", code="body_too_large",
                       headers=close)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is over the limit of {limit} bytes", code="body_too_large",
                           headers=close)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request) -> Any:
    """The request body as JSON; invalid UTF-8, malformed JSON or an oversized body are 4xx errors."""
    raw = await read_body(request)
    if not raw.strip():
        raise APIError(400, "request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(400, f"request body is not valid UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})",
                       code="invalid_utf8") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise APIError(400, f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}",
                       code="invalid_json") from None


def parse(model: type[M], payload: Any) -> M:
    """Validate ``payload`` against ``model``; errors, and fields the gateway would not honour, become a 400
    naming the field."""
    if not isinstance(payload, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(payload).__name__}")
    try:
        parsed = model.model_validate(payload)
    except ValidationError as err:
        message, param = validation_message(err.errors())
        raise APIError(400, message, param=param) from None
    unsupported = parsed.unsupported_fields() if isinstance(parsed, APIRequest) else []
    if unsupported:
        detail = "; ".join(f"{name}: {why}" for name, why in unsupported)
        raise APIError(400, f"unsupported request parameter{'s' if len(unsupported) > 1 else ''} ({detail})",
                       param=unsupported[0][0], code="unsupported_parameter")
    return parsed


def context(request: Request, route: str, user: str | None = None, admin: bool = False,
            prefix: str = "chatcmpl", cost: int = 1) -> RequestContext:
    """Authenticate, charge ``cost`` to the caller's rate limit and build the request context (user from
    the body, else the X-User-Id header). Routes that generate pass ``cost=0`` and call
    ``Gateway.limit`` once the body says how many generations they will run."""
    gw = gateway(request)
    if gw.draining:
        raise APIError(503, "the gateway is shutting down", code="draining", headers={"Retry-After": "1"})
    key = gw.authenticate(request.headers.get("authorization"), admin=admin)
    client = f"key:{key.key_id}" if key else f"addr:{request.client.host if request.client else 'unknown'}"
    ctx = RequestContext(request_id=new_id(prefix), route=route, key=key, client=client,
                         user=user or request.headers.get(USER_HEADER), override=request.headers.get(OVERRIDE_HEADER))
    request.state.ctx = ctx
    if cost:
        gw.limit(ctx, cost)
    return ctx
