"""Impressions and their outcomes: CTR and conversion per scenario, experiment and arm.

Every Recommend answer is an impression of its items, remembered by request id (bounded, for
``ttl_s``). A click, add-to-cart or purchase event that carries the ``request_id`` it answers is
attributed to that impression when the item was in it. An event for a response another replica
served (or one older than the memory) is still attributed when it names the scenario: the arm is
a hash of the user id, so every replica computes the same one. Prometheus gets
``recsys_impressions_total``, ``recsys_clicks_total`` and ``recsys_conversions_total`` (labels
``scenario``, ``experiment``, ``arm``; conversions also ``type``): CTR per arm is
``rate(clicks) / rate(impressions)``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from prometheus_client import CollectorRegistry, Counter

from recsys.scenario.catalog import Catalog
from recsys.scenario.config import Scenario, ScenarioSet
from recsys.scenario.context import RecommendResult
from recsys.serving.metrics import CachedLabels, get_or_create
from recsys.v1 import common_pb2

OUTCOMES = {common_pb2.CLICK: "click", common_pb2.ADD_TO_CART: "add_to_cart", common_pb2.PURCHASE: "purchase"}


class Impression(NamedTuple):
    """One answered Recommend: who saw which items (packed int32 indices into the catalog of
    fingerprint ``catalog``, ~100 bytes for 20 items), in which scenario arm. Only strings, bytes
    and a float: the log keeps each as a plain tuple, which the collector stops tracking, so a full
    log adds no GC work."""

    user_id: str
    scenario: str
    experiment: str
    arm: str
    catalog: str
    items: bytes
    at: float

    def shows(self, item_id: str, catalog: Catalog | None) -> bool | None:
        """Whether ``item_id`` was shown; None when ``catalog`` is not the one it was shown from."""
        if catalog is None or catalog.fingerprint != self.catalog:
            return None
        index = catalog.index.get(item_id, -1)
        return index >= 0 and index in np.frombuffer(self.items, dtype=np.int32)


class ImpressionMetrics:
    """The impression and outcome counters, registered once per registry."""

    def __init__(self, registry: CollectorRegistry):
        labels = ["scenario", "experiment", "arm"]
        self.impressions = CachedLabels(
            get_or_create(
                registry,
                "recsys_impressions",
                lambda: Counter(
                    "recsys_impressions", "Items returned by Recommend", labels, registry=registry
                ),
            )
        )
        self.clicks = CachedLabels(
            get_or_create(
                registry,
                "recsys_clicks",
                lambda: Counter(
                    "recsys_clicks", "Click events attributed to a returned item", labels, registry=registry
                ),
            )
        )
        self.conversions = CachedLabels(
            get_or_create(
                registry,
                "recsys_conversions",
                lambda: Counter(
                    "recsys_conversions",
                    "Add-to-cart and purchase events attributed to a returned item",
                    [*labels, "type"],
                    registry=registry,
                ),
            )
        )


class ImpressionLog:
    """Recent impressions by request id (at most ``capacity``, each for ``ttl_s``)."""

    def __init__(
        self,
        metrics: ImpressionMetrics,
        capacity: int = 50_000,  # ~0.4 KB each
        ttl_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.metrics = metrics
        self.capacity = capacity
        self.ttl_s = ttl_s
        self.clock = clock
        self._by_request: OrderedDict[str, tuple] = OrderedDict()  # plain tuples of Impression fields

    def __len__(self) -> int:
        return len(self._by_request)

    def record(self, request_id: str, user_id: str, scenario: Scenario, result: RecommendResult) -> None:
        """Count an answer's items as impressions and remember them under ``request_id``."""
        experiment, arm = scenario.experiment_name, scenario.arm
        count = len(result.candidates)
        if count:
            self.metrics.impressions.labels(scenario.name, experiment, arm).inc(count)
        if not request_id or result.catalog is None:
            return
        now = self.clock()
        items = result.candidates.items.astype(np.int32).tobytes()
        self._by_request[request_id] = (
            user_id,
            scenario.name,
            experiment,
            arm,
            result.catalog.fingerprint,
            items,
            now,
        )
        self._by_request.move_to_end(request_id)
        while len(self._by_request) > self.capacity:
            self._by_request.popitem(last=False)
        while self._by_request:  # expire from the oldest
            oldest = Impression._make(next(iter(self._by_request.values())))
            if now - oldest.at <= self.ttl_s:
                break
            self._by_request.popitem(last=False)

    def attribute(
        self,
        request_id: str,
        user_id: str,
        item_id: str,
        event_type: int,
        scenario_name: str,
        scenarios: ScenarioSet,
        catalog: Catalog | None,
    ) -> tuple[str, str, str] | None:
        """Count one new event against the impression it answers; returns the (scenario,
        experiment, arm) it was credited to, or None (not an outcome, no request id, another
        user's request, an item that was not shown, or nothing to attribute it to). ``catalog``
        is the one the gateway holds now (an impression of an older catalog counts as its arm's)."""
        outcome = OUTCOMES.get(event_type)
        if outcome is None or not request_id:
            return None
        stored = self._by_request.get(request_id)
        impression = None if stored is None else Impression._make(stored)
        if impression is not None and self.clock() - impression.at > self.ttl_s:
            impression = None
        if impression is not None:
            if impression.user_id != user_id or impression.shows(item_id, catalog) is False:
                return None
            credited = (impression.scenario, impression.experiment, impression.arm)
        else:  # served elsewhere or forgotten: the scenario's arm is a function of the user
            scenario = scenarios.get(scenario_name)
            if scenario is None or not user_id:
                return None
            variant = scenario.variant_for(user_id)
            credited = (scenario.name, variant.experiment_name, variant.arm)
        if outcome == "click":
            self.metrics.clicks.labels(*credited).inc()
        else:
            self.metrics.conversions.labels(*credited, outcome).inc()
        return credited
