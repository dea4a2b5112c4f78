"""The gateway's metrics (docs/CONVENTIONS.md): the scenario pipeline's own plus requests,
ingested events, requests in flight and its calls to recall and rank."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from recsys.scenario.pipeline import ScenarioMetrics
from recsys.serving.metrics import CachedLabels, get_or_create


class GatewayMetrics(ScenarioMetrics):
    """Registered once per registry."""

    def __init__(self, registry: CollectorRegistry):
        super().__init__(registry)
        self.requests = CachedLabels(
            get_or_create(
                registry,
                "recsys_requests",
                lambda: Counter(
                    "recsys_requests",
                    "Recommend requests by scenario and outcome",
                    ["scenario", "outcome"],
                    registry=registry,
                ),
            )
        )
        self.events_ingested = CachedLabels(
            get_or_create(
                registry,
                "recsys_events_ingested",
                lambda: Counter(
                    "recsys_events_ingested", "Events newly stored, by type", ["type"], registry=registry
                ),
            )
        )
        self.in_flight: Gauge = get_or_create(
            registry,
            "recsys_in_flight_requests",
            lambda: Gauge("recsys_in_flight_requests", "Recommend requests being served", registry=registry),
        )


def downstream_call_size(registry: CollectorRegistry | None, service: str) -> Callable[[int], None] | None:
    """``recsys_gateway_downstream_call_requests{service}``'s observe: requests per call to
    ``service`` (1 = a plain call; more = a batch call of the requests that queued meanwhile)."""
    if registry is None:
        return None
    name = "recsys_gateway_downstream_call_requests"
    histogram = get_or_create(
        registry,
        name,
        lambda: Histogram(
            name,
            "Requests per call to recall or rank (batch calls under load)",
            ["service"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=registry,
        ),
    )
    return histogram.labels(service=service).observe


def downstream_releases(registry: CollectorRegistry | None, service: str) -> Callable[[], None] | None:
    """``recsys_gateway_downstream_released_calls_total{service}``'s inc: batch calls sent past
    the in-flight limit because their requests had waited ``downstream_max_hold_ms``."""
    if registry is None:
        return None
    name = "recsys_gateway_downstream_released_calls"
    counter = get_or_create(
        registry,
        name,
        lambda: Counter(
            name,
            "Calls to recall or rank sent past the in-flight limit after requests waited the max hold",
            ["service"],
            registry=registry,
        ),
    )
    return counter.labels(service=service).inc
