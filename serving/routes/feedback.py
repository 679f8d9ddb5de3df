"""POST /v1/feedback: one score for an earlier response, from the key that made it, stored durably
for the A/B report."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.errors import APIError
from serving.feedback import DuplicateFeedbackError, ForeignRequestError, UnknownRequestError
from serving.protocol import FeedbackRequest
from serving.routes.common import context, gateway, parse, read_json

router = APIRouter()


@router.post("/v1/feedback")
async def feedback(request: Request) -> JSONResponse:
    ctx = context(request, "feedback")
    body = parse(FeedbackRequest, await read_json(request))
    gw = gateway(request)
    key_id = ctx.key.key_id if ctx.key else None
    try:
        variant = await asyncio.to_thread(gw.feedback.add_feedback, body.request_id, body.score, body.comment,
                                          key_id)
    except UnknownRequestError:
        raise APIError(404, f"unknown request_id {body.request_id!r} (use the id of a served response)",
                       param="request_id", code="unknown_request") from None
    except ForeignRequestError:
        raise APIError(403, f"request {body.request_id!r} was made with another API key; only that key may "
                       "rate it", param="request_id", code="not_your_request") from None
    except DuplicateFeedbackError:
        raise APIError(409, f"request {body.request_id!r} already has feedback (one score per request)",
                       param="request_id", code="feedback_exists") from None
    gw.metrics.feedback.labels(variant).inc()
    return JSONResponse({"status": "recorded", "request_id": body.request_id, "variant": variant})
