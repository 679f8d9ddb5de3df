"""POST /v1/feedback: a score for an earlier response, stored durably for the A/B report."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.errors import APIError
from serving.feedback import UnknownRequestError
from serving.protocol import FeedbackRequest
from serving.routes.common import context, gateway, parse, read_json

router = APIRouter()


@router.post("/v1/feedback")
async def feedback(request: Request) -> JSONResponse:
    context(request, "feedback")
    body = parse(FeedbackRequest, await read_json(request))
    gw = gateway(request)
    try:
        variant = await asyncio.to_thread(gw.feedback.add_feedback, body.request_id, body.score, body.comment)
    except UnknownRequestError:
        raise APIError(404, f"unknown request_id {body.request_id!r} (use the id of a served response)",
                       param="request_id", code="unknown_request") from None
    gw.metrics.feedback.labels(variant).inc()
    return JSONResponse({"status": "recorded", "request_id": body.request_id, "variant": variant})
