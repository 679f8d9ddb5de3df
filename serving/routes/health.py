"""Liveness, readiness and Prometheus metrics (no API key needed: probes and scrapers)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from serving.routes.common import gateway

router = APIRouter()


@router.get("/health/live")
async def live() -> JSONResponse:
    """200 while the process and its event loop answer."""
    return JSONResponse({"status": "alive"})


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """200 when the gateway is not draining and every variant serves, except those whose registry alias
    does not exist (a champion without a challenger); else 503. ``details`` says why per variant."""
    gw = gateway(request)
    ok, states, details = gw.ready()
    body = {"status": "ready" if ok else "not_ready", "draining": gw.draining, "variants": states,
            "details": details}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw = gateway(request)
    return Response(gw.metrics.render(), media_type=gw.metrics.content_type)
