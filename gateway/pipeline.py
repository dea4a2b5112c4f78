"""A scenario's pipeline: history -> recall -> rank -> rerank, with per-stage deadlines and fallbacks.

Candidates travel columnar end to end: recall answers packed arrays of catalog indices and
scores, the gateway keeps them as :class:`~gateway.rerank.Candidates`, sends the same arrays to
rank, applies the re-rank rules on arrays, and only the ``num_items`` it returns become messages.
The :class:`~gateway.catalog.Catalog` (fetched from recall) maps external ids to indices and back.

The caller's deadline (capped by the scenario's budget) is split between the stages; every
downstream call carries its share. Faults degrade, they do not fail:

- rank slow, down, failing or on another catalog -> the recall order, ``degraded``
  (reason ``rank_<code>``, ``rank_catalog_mismatch``);
- recall slow, down, failing or on another catalog -> the catalog's popularity order (filtered
  like recall would: category, sponsored, exclusions), still ranked when rank is up, ``degraded``;
- history store failing or slow -> an empty history (cold start), ``degraded``
  (``history_unavailable`` / ``history_timeout``);
- nothing sensible to return (no catalog was ever fetched) -> :class:`PipelineUnavailable`.

In a traced call (``recsys.serving.tracing``) each stage is a span with the scenario and the
candidate counts, and recall and rank get the trace context in their call's metadata.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.catalog import Catalog, CatalogError, fetch_catalog
from gateway.history import HistoryStore
from gateway.rerank import Candidates, History, RerankInputs, apply_rules
from gateway.scenarios import RankStage, RecallStage, Scenario
from recsys.serving.metrics import LATENCY_BUCKETS, get_or_create
from recsys.serving.tracing import child_span, outgoing_metadata
from recsys.serving.validation import InvalidArgument
from recsys.serving.wire import FLAGS, INDEX, SCORE, flags_to_mask, pack, unpack
from recsys.sources import RECALL_SOURCES, SOURCE_INDEX
from recsys.v1 import common_pb2, gateway_pb2, rank_pb2, rank_pb2_grpc, recall_pb2, recall_pb2_grpc

log = logging.getLogger(__name__)

CANDIDATE_BUCKETS = (0, 1, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000)
MAX_SEEDS = 10
RESERVE_S = 0.002  # kept back from the last downstream call for re-rank and the response
HISTORY_TIMEOUT_S = 0.1  # the history store's share of a request; slower -> cold start, degraded
CATALOG_TIMEOUT_S = 10.0
ATTENDED_TOP = 3


class PipelineUnavailable(RuntimeError):
    """No downstream answered and there is no fallback to serve."""


class CatalogMismatchError(RuntimeError):
    """A downstream answered (or refused) for another catalog than the gateway's."""


class GatewayMetrics:
    """The gateway's own metrics (docs/CONVENTIONS.md), registered once per registry."""

    def __init__(self, registry: CollectorRegistry):
        self.stage_seconds: Histogram = get_or_create(
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
        self.requests: Counter = get_or_create(
            registry,
            "recsys_requests",
            lambda: Counter(
                "recsys_requests",
                "Recommend requests by scenario and outcome",
                ["scenario", "outcome"],
                registry=registry,
            ),
        )
        self.candidates: Histogram = get_or_create(
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
        self.fallbacks: Counter = get_or_create(
            registry,
            "recsys_fallbacks",
            lambda: Counter(
                "recsys_fallbacks",
                "Fallbacks taken because a downstream failed",
                ["scenario", "reason"],
                registry=registry,
            ),
        )
        self.events_ingested: Counter = get_or_create(
            registry,
            "recsys_events_ingested",
            lambda: Counter(
                "recsys_events_ingested", "Events newly stored, by type", ["type"], registry=registry
            ),
        )
        self.in_flight: Gauge = get_or_create(
            registry,
            "recsys_in_flight_requests",
            lambda: Gauge("recsys_in_flight_requests", "Recommend requests being served", registry=registry),
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


@dataclass(frozen=True)
class RecommendInputs:
    """What one request brings, validated by the servicer."""

    scenario: Scenario
    user_id: str
    num_items: int
    context_item_ids: tuple[str, ...] = ()
    context_category: str = ""
    history: tuple[common_pb2.HistoryItem, ...] | None = None  # given by a stateless client
    debug: bool = False
    request_id: str = ""


@dataclass
class RecommendResult:
    """What the pipeline served: the final candidates and how it got them."""

    candidates: Candidates
    catalog: Catalog | None = None
    history: History = field(default_factory=History)
    degraded_reasons: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    @property
    def model_version(self) -> str:
        return ",".join(f"{kind}={version}" for kind, version in sorted(self.model_versions.items()))

    @property
    def item_ids(self) -> list[str]:
        if self.catalog is None:
            return []
        ids = self.catalog.item_ids
        return [ids[index] for index in self.candidates.items.tolist()]

    def scored_items(self, debug: bool) -> list[gateway_pb2.ScoredItem]:
        """The wire form of the results (explanations and per-source detail when ``debug``)."""
        candidates = self.candidates
        sources = [RECALL_SOURCES[s] for s in candidates.sources.tolist()]
        scores = candidates.scores.tolist()
        item_ids = self.item_ids
        if not debug:
            return [
                gateway_pb2.ScoredItem(item_id=item_id, score=score, source=source)
                for item_id, score, source in zip(item_ids, scores, sources, strict=True)
            ]
        assert self.catalog is not None
        known = self.history.known
        masks = flags_to_mask(candidates.source_flags, len(RECALL_SOURCES)).tolist()
        source_scores = candidates.source_scores.tolist()
        rank_scores = None if candidates.rank_scores is None else candidates.rank_scores.tolist()
        attended = None if candidates.attended is None else candidates.attended.tolist()
        items = []
        for row, item_id in enumerate(item_ids):
            produced = {
                name: source_scores[row][column]
                for column, name in enumerate(RECALL_SOURCES)
                if masks[row][column]
            }
            rank_score = rank_scores[row] if rank_scores is not None else None
            if rank_score is not None and rank_score != rank_score:  # NaN: beyond max_candidates
                rank_score = None
            attended_ids = (
                [self.history.item_ids[known[p]] for p in attended[row] if 0 <= p < len(known)]
                if attended is not None
                else []
            )
            bid = float(self.catalog.item_bid[candidates.items[row]])
            scored = gateway_pb2.ScoredItem(
                item_id=item_id,
                score=scores[row],
                source=sources[row],
                explanation=explanation(produced or {sources[row]: 0.0}, rank_score, attended_ids, bid),
                recall_score=float(candidates.recall_scores[row]),
                sources=sorted(produced) or [sources[row]],
                attended_item_ids=attended_ids,
            )
            if rank_score is not None:
                scored.rank_score = rank_score
            items.append(scored)
        return items


def explanation(
    source_scores: dict[str, float], rank_score: float | None, attended: list[str], bid: float
) -> str:
    """A one-line human reason for a debug response."""
    sources = ", ".join(
        f"{source} {score:.3f}" for source, score in sorted(source_scores.items(), key=lambda kv: -kv[1])
    )
    parts = [f"recall: {sources}"]
    if rank_score is not None:
        parts.append(f"rank score {rank_score:.3f}")
    if attended:
        parts.append(f"attended to {', '.join(attended)}")
    if bid > 0:
        parts.append(f"bid {bid:.3f}")
    return "; ".join(parts)


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


def seed_items(stage: RecallStage, context_ids: Sequence[str], history: History) -> list[str]:
    """The recall seeds: the first of the stage's seed sources that yields any item."""
    for seed_source in stage.seeds:
        if seed_source == "context.item_ids":
            seeds = list(dict.fromkeys(context_ids))
        elif seed_source == "history.cart":
            seeds = cart_items(history)
        else:  # history.recent
            seeds = list(dict.fromkeys(reversed(history.item_ids)))
        if seeds:
            return seeds[:MAX_SEEDS]
    return []


def recall_sources(stage: RecallStage, seeds: Sequence[str]) -> list[tuple[str, int]]:
    """The stage's source quotas for this request: i2i needs seeds, so without any (an empty
    cart) its quota is dropped; if nothing is left, popular fills the list."""
    if seeds:
        return list(stage.sources)
    sources = [(source, quota) for source, quota in stage.sources if source != "i2i"]
    if stage.sources and not sources:
        return [("popular", stage.k)]
    return sources


def cart_items(history: History) -> list[str]:
    """Items added to the cart and not purchased since, newest first."""
    in_cart: dict[str, None] = {}
    for item_id, event_type in zip(history.item_ids, history.types.tolist(), strict=True):
        if event_type == common_pb2.ADD_TO_CART:  # oldest first: a later purchase empties it
            in_cart.pop(item_id, None)
            in_cart[item_id] = None
        elif event_type == common_pb2.PURCHASE:
            in_cart.pop(item_id, None)
    return list(reversed(in_cart))


def popular_fallback(
    catalog: Catalog,
    stage: RecallStage,
    history: History,
    context_items: np.ndarray,
    category: int,
    depth: int,
) -> Candidates:
    """The catalog's most popular items (the first ``depth``) that pass ``stage``'s filters, up to
    ``stage.k``: what the gateway serves when recall cannot answer."""
    ranked = catalog.popular[:depth]
    keep = np.ones(len(ranked), dtype=bool)
    excluded = []
    if stage.exclude_history:
        excluded.append(history.indices[history.indices >= 0])
    if stage.exclude_context:
        excluded.append(context_items[context_items >= 0])
    if excluded:
        keep &= ~np.isin(ranked, np.concatenate(excluded))
    if stage.category_from_context:
        keep &= catalog.item_category[ranked] == category
    if stage.sponsored_only:
        keep &= catalog.item_bid[ranked] > 0
    positions = np.flatnonzero(keep)[: stage.k]
    scores = (1.0 / (1.0 + positions)).astype(np.float32)  # popularity rank as a score
    return Candidates.from_source(ranked[positions], scores, "popular")


def decode_recall(response: recall_pb2.RecallResponse, catalog: Catalog) -> Candidates:
    """Recall's packed answer as Candidates in the canonical source order; ValueError when malformed."""
    if response.catalog != catalog.fingerprint:
        raise CatalogMismatchError("recall answered for another catalog")
    items = unpack(response.items, INDEX, "items")
    count = len(items)
    if count and (int(items.min()) < 0 or int(items.max()) >= len(catalog)):
        raise ValueError("recall returned an index outside the catalog")
    names = list(response.source_names)
    try:
        columns = np.asarray([SOURCE_INDEX[name] for name in names], dtype=np.int64)
    except KeyError as error:
        raise ValueError(f"recall returned an unknown source {error}") from None
    scores = unpack(response.scores, SCORE, "scores", count)
    primary = unpack(response.sources, FLAGS, "sources", count)
    given = unpack(response.source_scores, SCORE, "source_scores", count * len(names)).reshape(
        count, len(names)
    )
    flags = unpack(response.source_flags, FLAGS, "source_flags", count)
    if count and int(primary.max()) >= len(names):
        raise ValueError("recall returned a primary source outside source_names")
    if names == list(RECALL_SOURCES):
        source_scores, source_flags, sources = given, flags, primary
    else:  # another source order: move columns and bits to ours
        source_scores = np.zeros((count, len(RECALL_SOURCES)), dtype=np.float32)
        source_scores[:, columns] = given
        mask = flags_to_mask(flags, len(names))
        source_flags = np.zeros(count, dtype=np.uint8)
        for position, column in enumerate(columns.tolist()):
            source_flags |= (mask[:, position] << column).astype(np.uint8)
        sources = columns[primary].astype(np.uint8)
    return Candidates(
        items=items,
        recall_scores=scores,
        sources=sources,
        source_scores=source_scores,
        source_flags=source_flags,
        scores=scores,
    )


def _failure_reason(stage: str, error: BaseException) -> str:
    if isinstance(error, CatalogMismatchError):
        return f"{stage}_catalog_mismatch"
    if isinstance(error, grpc.aio.AioRpcError):
        if error.code() == grpc.StatusCode.FAILED_PRECONDITION and "catalog" in (error.details() or ""):
            return f"{stage}_catalog_mismatch"
        return f"{stage}_{error.code().name.lower()}"
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return f"{stage}_deadline_exceeded"
    if isinstance(error, ValueError):
        return f"{stage}_bad_response"
    return f"{stage}_error"


class Pipeline:
    """Runs scenarios against the recall and rank backends (gRPC stubs, or in-process ones with
    the same methods), the history store and the catalog."""

    def __init__(
        self,
        recall: recall_pb2_grpc.RecallServiceStub,
        rank: rank_pb2_grpc.RankServiceStub,
        history_store: HistoryStore,
        metrics: GatewayMetrics,
        max_history_length: int,
        fallback_depth: int = 1000,
        history_timeout_s: float = HISTORY_TIMEOUT_S,
    ):
        self.recall = recall
        self.rank = rank
        self.history_store = history_store
        self.metrics = metrics
        self.max_history_length = max_history_length
        self.fallback_depth = fallback_depth
        self.history_timeout_s = history_timeout_s
        self.catalog: Catalog | None = None
        self._catalog_refresh: asyncio.Task[bool] | None = None

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
            given = inputs.history[-self.max_history_length :]
            return to_history(
                [h.item_id for h in given], [h.type for h in given], [h.timestamp_ms for h in given], catalog
            )
        if not inputs.user_id:
            return History()
        events = await self.history_store.history(inputs.user_id, self.max_history_length)
        return to_history(
            [e.item_id for e in events],
            [e.event_type for e in events],
            [e.timestamp_ms for e in events],
            catalog,
        )

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

        stage = scenario.recall
        category = -1
        if stage.category_from_context:
            category = catalog.category_of(inputs.context_category)
            if category < 0:
                raise InvalidArgument("context.category", "unknown category")
        context_items = catalog.indices(inputs.context_item_ids)

        history_budget = min(self.history_timeout_s, max(0.0, deadline - time.monotonic()))
        with child_span("stage history", {"recsys.scenario": name, "recsys.stage": "history"}) as span:
            try:
                if inputs.history is not None or not inputs.user_id:  # no store to wait for
                    history = await self.load_history(inputs, catalog)
                else:
                    history = await asyncio.wait_for(self.load_history(inputs, catalog), history_budget)
            except TimeoutError:
                log.warning(
                    "history store slower than %.0f ms: serving without history", history_budget * 1000
                )
                result.degraded_reasons.append("history_timeout")
                history = History()
            except Exception as error:  # the store is down: serve the user as a cold start
                log.warning("history store failed, serving without history: %r", error)
                result.degraded_reasons.append("history_unavailable")
                history = History()
            span.set_attribute("recsys.history_length", len(history.item_ids))
        result.history = history
        unknown = int((history.indices < 0).sum() + (context_items < 0).sum())
        if unknown:
            self.metrics.unknown_items.inc(unknown)
        mark = timed("history", started)

        # The stages run in the order the scenario declares them (validated at load: each
        # stage's needs are met by the request or an earlier stage).
        candidates = Candidates.empty()
        for stage in scenario.stages:
            if isinstance(stage, RankStage) and not len(candidates):
                continue
            attributes = {
                "recsys.scenario": name,
                "recsys.stage": stage.kind,
                "recsys.candidates_in": len(candidates),
            }
            with child_span(f"stage {stage.kind}", attributes) as span:
                if isinstance(stage, RecallStage):
                    candidates = await self._recall(
                        inputs, catalog, history, context_items, category, deadline, result
                    )
                elif isinstance(stage, RankStage):
                    candidates = await self._rank(
                        inputs, stage, catalog, history, candidates, deadline, result
                    )
                else:
                    rerank_inputs = RerankInputs(
                        catalog=catalog,
                        history=history,
                        context_items=context_items[context_items >= 0],
                        now_ms=int(time.time() * 1000),
                    )
                    candidates = apply_rules(stage.rules, candidates, rerank_inputs)
                span.set_attribute("recsys.candidates_out", len(candidates))
            self.metrics.candidates.labels(name, stage.kind).observe(len(candidates))
            mark = timed(stage.kind, mark)

        result.candidates = candidates.head(inputs.num_items)
        timed("total", started)
        for reason in result.degraded_reasons:
            self.metrics.fallbacks.labels(name, reason).inc()
        return result

    async def _recall(
        self,
        inputs: RecommendInputs,
        catalog: Catalog,
        history: History,
        context_items: np.ndarray,
        category: int,
        deadline: float,
        result: RecommendResult,
    ) -> Candidates:
        scenario = inputs.scenario
        stage = scenario.recall
        rank = scenario.rank
        rank_ms = rank.timeout_ms if rank is not None else 0.0
        remaining = deadline - time.monotonic()
        # The recall stage gets its configured budget, or its proportional share of what is left.
        timeout = min(stage.timeout_ms / 1000, remaining * stage.timeout_ms / (stage.timeout_ms + rank_ms))
        seeds = seed_items(stage, inputs.context_item_ids, history)
        seed_indices = catalog.indices(seeds)
        history_items, history_types = history.packed
        request = recall_pb2.RecallRequest(
            request_id=inputs.request_id,
            user_id=inputs.user_id,
            scenario=scenario.model_scenario_name,
            catalog=catalog.fingerprint,
            history_items=history_items,
            history_types=history_types,
            seed_items=pack(seed_indices[seed_indices >= 0], INDEX),
            sources=[recall_pb2.SourceQuota(source=s, k=k) for s, k in recall_sources(stage, seeds)],
            k=stage.k,
            filters=recall_pb2.RecallFilters(
                exclude_history=stage.exclude_history,
                exclude_items=pack(context_items[context_items >= 0], INDEX)
                if stage.exclude_context
                else b"",
                category=inputs.context_category if stage.category_from_context else "",
                sponsored_only=stage.sponsored_only,
            ),
        )
        try:
            if timeout <= 0:
                raise TimeoutError("no time left for recall")
            response = await self.recall.Recall(request, timeout=timeout, metadata=outgoing_metadata())
            candidates = decode_recall(response, catalog)
        except (grpc.aio.AioRpcError, TimeoutError, ValueError, CatalogMismatchError) as error:
            reason = _failure_reason("recall", error)
            if reason.endswith("catalog_mismatch"):
                self.refresh_catalog_soon()
            log.warning(
                "recall failed, serving the popular fallback",
                extra={"scenario": scenario.name, "reason": reason},
            )
            result.degraded_reasons.append(reason)
            return popular_fallback(catalog, stage, history, context_items, category, self.fallback_depth)
        result.model_versions["recall"] = response.model_version
        return candidates

    async def _rank(
        self,
        inputs: RecommendInputs,
        stage: RankStage,
        catalog: Catalog,
        history: History,
        candidates: Candidates,
        deadline: float,
        result: RecommendResult,
    ) -> Candidates:
        to_rank = candidates.head(stage.max_candidates)
        count = len(to_rank)
        timeout = min(stage.timeout_ms / 1000, deadline - time.monotonic() - RESERVE_S)
        history_items, history_types = history.packed
        request = rank_pb2.RankRequest(
            request_id=inputs.request_id,
            user_id=inputs.user_id,
            scenario=inputs.scenario.model_scenario_name,
            catalog=catalog.fingerprint,
            history_items=history_items,
            history_types=history_types,
            candidate_items=pack(to_rank.items, INDEX),
            recall_scores=pack(to_rank.recall_scores, SCORE),
            source_names=RECALL_SOURCES,
            source_scores=pack(to_rank.source_scores, SCORE),
            source_flags=pack(to_rank.source_flags, FLAGS),
            debug=inputs.debug,
        )
        try:
            if timeout <= 0:
                raise TimeoutError("no time left for rank")
            response = await self.rank.Rank(request, timeout=timeout, metadata=outgoing_metadata())
            if response.catalog != catalog.fingerprint:
                raise CatalogMismatchError("rank answered for another catalog")
            scores = unpack(response.scores, SCORE, "scores", count)
            if not np.isfinite(scores).all():
                raise ValueError("rank returned non-finite scores")
            attended = None
            if inputs.debug and response.attended:
                attended = unpack(response.attended, INDEX, "attended", count * ATTENDED_TOP)
                attended = attended.reshape(count, ATTENDED_TOP)
        except (grpc.aio.AioRpcError, TimeoutError, ValueError, CatalogMismatchError) as error:
            reason = _failure_reason("rank", error)
            log.warning(
                "rank failed, serving the recall order",
                extra={"scenario": inputs.scenario.name, "reason": reason},
            )
            result.degraded_reasons.append(reason)
            return candidates
        result.model_versions["rank"] = response.model_version
        # Stable sort: ties keep the recall order. Candidates beyond max_candidates follow, unranked.
        order = np.argsort(-scores, kind="stable")
        rest = len(candidates) - count
        ranked = candidates.take(np.concatenate([order, np.arange(count, len(candidates))]))
        rank_scores = np.concatenate([scores[order], np.full(rest, np.nan, np.float32)])
        new_scores = np.concatenate([scores[order], ranked.scores[count:]])
        if attended is not None:
            attended = np.concatenate([attended[order], np.full((rest, ATTENDED_TOP), -1, np.int32)])
        return ranked.with_scores(new_scores, rank_scores=rank_scores, attended=attended)
