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

    def render(self) -> bytes:
        return generate_latest(self.registry)
