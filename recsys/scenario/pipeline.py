"""Runs a compiled scenario: history -> its stages in order, with per-stage deadlines and fallbacks.

Candidates travel columnar end to end: recall answers packed arrays of catalog indices and
scores, the stages keep them as :class:`~recsys.scenario.candidates.Candidates`, rank gets the
same arrays, the re-rank rules work on arrays, and only the ``num_items`` returned become
messages (in the gateway). The :class:`~recsys.scenario.catalog.Catalog` (fetched from recall)
maps external ids to indices and back.

The caller's deadline (capped by the scenario's budget) is split between the stages; every
downstream call carries its share. Faults degrade, they do not fail:

- rank slow, down, failing or on another catalog -> the recall order, ``degraded``
  (reason ``rank_<code>``, ``rank_catalog_mismatch``);
- recall slow, down, failing or on another catalog -> the catalog's popularity order (filtered
  like recall would: category, sponsored, exclusions), still ranked when rank is up, ``degraded``;
- history store failing or slow -> an empty history (cold start), ``degraded``
  (``history_unavailable`` / ``history_timeout``);
- nothing sensible to return (no catalog was ever fetched) -> :class:`PipelineUnavailable`.

The same :class:`Pipeline` runs online (the gateway: gRPC stubs, its history store, Prometheus)
and offline (``recsys eval --scenario``, the ranker's training lists: in-process backends, the
history given with each request). In a traced call (``recsys.serving.tracing``) each stage is a
span with the scenario and the candidate counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from recsys.scenario.candidates import Candidates, History
from recsys.scenario.catalog import Catalog, CatalogError, fetch_catalog
from recsys.scenario.context import (
    Backends,
    PipelineUnavailable,
    RecommendInputs,
    RecommendResult,
    StageContext,
)
from recsys.serving.metrics import LATENCY_BUCKETS, CachedLabels, get_or_create
from recsys.serving.tracing import child_span
from recsys.serving.validation import InvalidArgument
from recsys.v1 import common_pb2

log = logging.getLogger(__name__)

CANDIDATE_BUCKETS = (0, 1, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000)
HISTORY_TIMEOUT_S = 0.1  # the history store's share of a request; slower -> cold start, degraded
CATALOG_TIMEOUT_S = 10.0


class StoredEventLike(Protocol):
    item_id: str
    event_type: int
    timestamp_ms: int


class HistorySource(Protocol):
    """Where a user's stored events come from (the gateway's history store)."""

    async def history(self, user_id: str, limit: int | None = None) -> Sequence[StoredEventLike]: ...


class ScenarioMetrics:
    """What running scenarios records (docs/CONVENTIONS.md), registered once per registry."""

    def __init__(self, registry: CollectorRegistry):
        self.stage_seconds = CachedLabels(
            get_or_create(
                registry,
                "recsys_stage_seconds",
                lambda: Histogram(
                    "recsys_stage_seconds",
                    "Time spent per pipeline stage, seconds",
                    ["scenario", "stage"],
                    buckets=LATENCY_BUCKETS,
                    registry=registry,
                ),
            )
        )
        self.candidates = CachedLabels(
            get_or_create(
                registry,
                "recsys_candidates",
                lambda: Histogram(
                    "recsys_candidates",
                    "Candidates leaving each stage",
                    ["scenario", "stage"],
                    buckets=CANDIDATE_BUCKETS,
                    registry=registry,
                ),
            )
        )
        self.fallbacks = CachedLabels(
            get_or_create(
                registry,
                "recsys_fallbacks",
                lambda: Counter(
                    "recsys_fallbacks",
                    "Fallbacks taken because a downstream failed",
                    ["scenario", "reason"],
                    registry=registry,
                ),
            )
        )
        self.unknown_items: Counter = get_or_create(
            registry,
            "recsys_unknown_items",
            lambda: Counter(
                "recsys_unknown_items",
                "History and context item ids not in the catalog (skipped)",
                registry=registry,
            ),
        )


def to_history(
    item_ids: Sequence[str], types: Sequence[int], timestamps_ms: Sequence[int], catalog: Catalog | None
) -> History:
    """A :class:`History` with catalog indices (all -1 without a catalog)."""
    count = len(item_ids)
    return History(
        item_ids=tuple(item_ids),
        types=np.fromiter(types, dtype=np.uint8, count=count),
        timestamps_ms=np.fromiter(timestamps_ms, dtype=np.int64, count=count),
        indices=catalog.indices(item_ids) if catalog is not None else np.full(count, -1, np.int32),
    )


def given_history(items: Sequence[common_pb2.HistoryItem], catalog: Catalog | None) -> History:
    """A stateless client's history (``HistoryItem`` messages, oldest first)."""
    return to_history(
        [h.item_id for h in items], [h.type for h in items], [h.timestamp_ms for h in items], catalog
    )


def stored_history(events: Sequence[StoredEventLike], catalog: Catalog | None) -> History:
    """The history store's events (oldest first)."""
    return to_history(
        [e.item_id for e in events], [e.event_type for e in events], [e.timestamp_ms for e in events], catalog
    )


class Pipeline:
    """Runs scenarios against the recall and rank backends (gRPC stubs, or in-process ones with
    the same methods), a history source and the catalog."""

    def __init__(
        self,
        recall,
        rank,
        history_store: HistorySource | None,
        metrics: ScenarioMetrics,
        max_history_length: int,
        fallback_depth: int = 1000,
        history_timeout_s: float = HISTORY_TIMEOUT_S,
    ):
        self.backends = Backends(recall=recall, rank=rank)
        self.history_store = history_store
        self.metrics = metrics
        self.max_history_length = max_history_length
        self.fallback_depth = fallback_depth
        self.history_timeout_s = history_timeout_s
        self.catalog: Catalog | None = None
        self._catalog_refresh: asyncio.Task[bool] | None = None

    @property
    def recall(self):
        return self.backends.recall

    @property
    def rank(self):
        return self.backends.rank

    # -- catalog ------------------------------------------------------------------------------

    async def refresh_catalog(self, timeout_s: float = CATALOG_TIMEOUT_S) -> bool:
        """Fetch the catalog recall serves (cheap when unchanged); False when recall cannot."""
        try:
            catalog = await fetch_catalog(self.recall, self.catalog, timeout_s)
        except (grpc.aio.AioRpcError, CatalogError, ValueError) as error:
            detail = error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
            log.warning("catalog refresh failed: %s", detail)
            return False
        if catalog is not self.catalog:
            log.info(
                "catalog %s (%d items, recall %s)", catalog.fingerprint[:12], len(catalog), catalog.version
            )
            self.catalog = catalog
        return True

    def refresh_catalog_soon(self) -> None:
        """Start one background refresh (after a catalog mismatch, or while none is held)."""
        if self._catalog_refresh is None or self._catalog_refresh.done():
            self._catalog_refresh = asyncio.ensure_future(self.refresh_catalog())

    async def close(self) -> None:
        if self._catalog_refresh is not None:
            self._catalog_refresh.cancel()

    # -- history ------------------------------------------------------------------------------

    async def load_history(self, inputs: RecommendInputs, catalog: Catalog) -> History:
        """The request's own history (stateless clients), else the stored one (oldest first)."""
        if inputs.history is not None:
            return given_history(inputs.history[-self.max_history_length :], catalog)
        if not inputs.user_id or self.history_store is None:
            return History()
        return stored_history(
            await self.history_store.history(inputs.user_id, self.max_history_length), catalog
        )

    async def _history_within_budget(
        self, inputs: RecommendInputs, catalog: Catalog, deadline: float, result: RecommendResult
    ) -> History:
        """The history, or an empty one (degraded) when the store is slow or failing."""
        if inputs.history is not None or not inputs.user_id or self.history_store is None:
            return await self.load_history(inputs, catalog)  # nothing to wait for
        budget = min(self.history_timeout_s, max(0.0, deadline - time.monotonic()))
        try:
            async with asyncio.timeout(budget):  # no task per request, unlike wait_for
                return await self.load_history(inputs, catalog)
        except TimeoutError:
            log.warning("history store slower than %.0f ms: serving without history", budget * 1000)
            result.degraded_reasons.append("history_timeout")
        except Exception as error:  # the store is down: serve the user as a cold start
            log.warning("history store failed, serving without history: %r", error)
            result.degraded_reasons.append("history_unavailable")
        return History()

    # -- the pipeline -------------------------------------------------------------------------

    async def run(self, inputs: RecommendInputs, deadline: float) -> RecommendResult:
        """Serve one request; ``deadline`` is a ``time.monotonic()`` instant."""
        scenario = inputs.scenario
        name = scenario.name
        catalog = self.catalog
        if catalog is None:
            self.refresh_catalog_soon()
            raise PipelineUnavailable("recall has not served the catalog yet: no candidates to serve")
        result = RecommendResult(candidates=Candidates.empty(), catalog=catalog)
        started = time.perf_counter()

        def timed(stage: str, since: float) -> float:
            now = time.perf_counter()
            result.timings_ms[stage] = (now - since) * 1000
            self.metrics.stage_seconds.labels(name, stage).observe(now - since)
            return now

        category = -1
        if scenario.recall.category_from_context:
            category = catalog.category_of(inputs.context_category)
            if category < 0:
                raise InvalidArgument("context.category", "unknown category")
        context_items = catalog.indices(inputs.context_item_ids)

        with child_span("stage history", {"recsys.scenario": name, "recsys.stage": "history"}) as span:
            history = await self._history_within_budget(inputs, catalog, deadline, result)
            span.set_attribute("recsys.history_length", len(history.item_ids))
        result.history = history
        unknown = int((history.indices < 0).sum() + (context_items < 0).sum())
        if unknown:
            self.metrics.unknown_items.inc(unknown)
        mark = timed("history", started)

        context = StageContext(
            inputs=inputs,
            catalog=catalog,
            history=history,
            context_items=context_items,
            category=category,
            deadline=deadline,
            result=result,
            backends=self.backends,
            fallback_depth=self.fallback_depth,
            on_catalog_mismatch=self.refresh_catalog_soon,
        )
        # The stages run in the order the scenario declares (validated at load: each stage's needs
        # are met by the request or an earlier stage).
        candidates = Candidates.empty()
        for stage in scenario.stages:
            attributes = {
                "recsys.scenario": name,
                "recsys.stage": stage.kind,
                "recsys.candidates_in": len(candidates),
            }
            with child_span(f"stage {stage.kind}", attributes) as span:
                candidates = await stage.run(context, candidates)
                span.set_attribute("recsys.candidates_out", len(candidates))
            self.metrics.candidates.labels(name, stage.kind).observe(len(candidates))
            mark = timed(stage.kind, mark)

        result.candidates = candidates.head(inputs.num_items)
        timed("total", started)
        for reason in result.degraded_reasons:
            self.metrics.fallbacks.labels(name, reason).inc()
        return result
