"""The gateway's metrics (docs/CONVENTIONS.md): the scenario pipeline's own plus requests,
ingested events and requests in flight."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

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
