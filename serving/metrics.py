"""Prometheus metrics of the gateway, labelled per variant.

Each app gets its own ``CollectorRegistry`` so several gateways (tests, bench) can live in one
process without duplicate-metric errors.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    """Counters, histograms and gauges the gateway updates."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "Requests by variant, route and HTTP status.",
                                ["variant", "route", "status"], registry=r)
        self.errors = Counter("lmforge_errors", "Failed generations by variant and kind.", ["variant", "kind"],
                              registry=r)
        self.ttft = Histogram("lmforge_ttft_seconds", "Time to first token.", ["variant"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("lmforge_latency_seconds", "Request latency (admission to last token).",
                                 ["variant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("lmforge_tokens", "Tokens processed.", ["variant", "kind"], registry=r)
        self.inflight = Gauge("lmforge_inflight_requests", "Requests generating now.", ["variant"], registry=r)
        self.queue_depth = Gauge("lmforge_queue_depth", "Requests waiting for an engine slot.", registry=r)
        # The alert on queue saturation divides by this (serve.max_queue), so it holds for any config.
        self.queue_limit = Gauge("lmforge_queue_limit", "Most requests that may wait (serve.max_queue).", registry=r)
        self.shed = Counter("lmforge_shed", "Requests refused before generation.", ["reason"], registry=r)
        self.fallbacks = Counter("lmforge_fallbacks", "Requests moved to the fallback variant.",
                                 ["variant", "fallback"], registry=r)
        self.swap_seconds = Gauge("lmforge_swap_seconds", "Duration of the last swap phase per variant.",
                                  ["variant", "phase"], registry=r)
        self.swaps = Counter("lmforge_swaps", "Completed model/adapter swaps.", ["variant", "kind"], registry=r)
        self.variant_ready = Gauge("lmforge_variant_ready", "1 when the variant serves.", ["variant"], registry=r)
        self.variant_version = Gauge("lmforge_variant_version", "Registry version served (0 = local dir).",
                                     ["variant"], registry=r)
        self.feedback = Counter("lmforge_feedback", "Feedback received.", ["variant"], registry=r)
        self.refused_version = Gauge("lmforge_refused_version",
                                     "Registry version the variant's alias names but may not serve (gates not "
                                     "passed, no force tag); 0 = none.", ["variant"], registry=r)
        self.promotions_refused = Counter("lmforge_promotions_refused", "Registry versions refused by the gate check.",
                                          ["variant"], registry=r)

        self.responses = Counter("lmforge_http_responses", "HTTP responses by route (path template; 'unmatched' "
                                 "for unknown paths) and status, refusals (400/401/403/404/413/429) included.",
                                 ["route", "status"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ResponseCounter:
    """ASGI middleware: count every HTTP response in ``lmforge_http_responses`` by route and status.

    Pure ASGI (not ``BaseHTTPMiddleware``), so streamed responses pass through untouched. The route is
    the matched path template, which the router records in the scope before the response starts.
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counted(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self._count(scope, message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except BaseException:
            if not started:  # the outer error handler answers 500
                self._count(scope, 500)
            raise

    def _count(self, scope, status: int) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.responses.labels(route, str(status)).inc()
