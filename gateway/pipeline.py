"""A scenario's pipeline: history -> recall -> rank -> rerank, with per-stage deadlines and fallbacks.

The caller's deadline (capped by the scenario's budget) is split between the stages; every
downstream call carries its share. Faults degrade, they do not fail:

- rank slow, down or failing -> the recall order, ``degraded`` (reason ``rank_<code>``);
- recall slow, down or failing -> the gateway's own cached popular table (filtered like recall
  would: category, sponsored, exclusions), still ranked when rank is up, ``degraded``;
- history store failing -> an empty history (cold start), ``degraded`` (``history_unavailable``);
- nothing sensible to return (recall down before the popular table was ever filled) ->
  :class:`PipelineUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.history import HistoryStore
from gateway.rerank import CandidateItem, RerankInputs, apply_rules
from gateway.scenarios import RecallStage, Scenario
from recsys.serving.metrics import LATENCY_BUCKETS, get_or_create
from recsys.v1 import common_pb2, gateway_pb2, rank_pb2, rank_pb2_grpc, recall_pb2, recall_pb2_grpc

log = logging.getLogger(__name__)

CANDIDATE_BUCKETS = (0, 1, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000, 5000)
MAX_SEEDS = 10
RESERVE_S = 0.002  # kept back from the last downstream call for re-rank and the response


class PipelineUnavailable(RuntimeError):
    """No downstream answered and there is no fallback to serve."""


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
    items: list[CandidateItem]
    degraded_reasons: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    @property
    def model_version(self) -> str:
        return ",".join(f"{kind}={version}" for kind, version in sorted(self.model_versions.items()))


def _candidate_item(candidate: recall_pb2.Candidate) -> CandidateItem:
    return CandidateItem(
        item_id=candidate.item_id,
        recall_score=candidate.score,
        source=candidate.source,
        source_scores=dict(candidate.source_scores),
        category=candidate.category,
        brand=candidate.brand,
        bid=candidate.bid,
        score=candidate.score,
    )


class PopularCache:
    """The gateway's own copy of recall's ``popular`` source: what it serves when recall is down."""

    def __init__(self, size: int):
        self.size = size
        self.candidates: list[recall_pb2.Candidate] = []
        self.refreshed_at: float | None = None

    async def refresh(
        self, recall: recall_pb2_grpc.RecallServiceStub, model_scenario: str, timeout_s: float
    ) -> None:
        """Fetch the global popular list from recall; raises on failure (the old table is kept)."""
        response = await recall.Recall(
            recall_pb2.RecallRequest(
                request_id="gateway-popular-refresh",
                scenario=model_scenario,
                sources=[recall_pb2.SourceQuota(source="popular", k=self.size)],
                k=self.size,
            ),
            timeout=timeout_s,
            wait_for_ready=True,  # at start-up recall may still be coming up
        )
        self.candidates = list(response.candidates)
        self.refreshed_at = time.time()

    def select(
        self, stage: RecallStage, history_ids: set[str], context_ids: Sequence[str], category: str
    ) -> list[CandidateItem]:
        """The cached popular items that pass ``stage``'s filters, up to ``stage.k``."""
        excluded = set(history_ids) if stage.exclude_history else set()
        if stage.exclude_context:
            excluded |= set(context_ids)
        selected = []
        for candidate in self.candidates:
            if candidate.item_id in excluded:
                continue
            if stage.category_from_context and candidate.category != category:
                continue
            if stage.sponsored_only and candidate.bid <= 0:
                continue
            item = _candidate_item(candidate)
            item.source = "popular"
            selected.append(item)
            if len(selected) >= stage.k:
                break
        return selected


def seed_items(
    stage: RecallStage, context_ids: Sequence[str], history: Sequence[common_pb2.HistoryItem]
) -> list[str]:
    """The recall seeds: the first of the stage's seed sources that yields any item."""
    for seed_source in stage.seeds:
        if seed_source == "context.item_ids":
            seeds = list(dict.fromkeys(context_ids))
        elif seed_source == "history.cart":
            seeds = cart_items(history)
        else:  # history.recent
            seeds = list(dict.fromkeys(entry.item_id for entry in reversed(history)))
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


def cart_items(history: Sequence[common_pb2.HistoryItem]) -> list[str]:
    """Items added to the cart and not purchased since, newest first."""
    in_cart: dict[str, None] = {}
    for entry in history:  # oldest first: a later purchase empties that item from the cart
        if entry.type == common_pb2.ADD_TO_CART:
            in_cart.pop(entry.item_id, None)
            in_cart[entry.item_id] = None
        elif entry.type == common_pb2.PURCHASE:
            in_cart.pop(entry.item_id, None)
    return list(reversed(in_cart))


def _failure_reason(stage: str, error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{stage}_{error.code().name.lower()}"
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return f"{stage}_deadline_exceeded"
    return f"{stage}_error"


class Pipeline:
    """Runs scenarios against the recall and rank services (stubs injected)."""

    def __init__(
        self,
        recall: recall_pb2_grpc.RecallServiceStub,
        rank: rank_pb2_grpc.RankServiceStub,
        history_store: HistoryStore,
        popular_cache: PopularCache,
        metrics: GatewayMetrics,
        max_history_length: int,
    ):
        self.recall = recall
        self.rank = rank
        self.history_store = history_store
        self.popular_cache = popular_cache
        self.metrics = metrics
        self.max_history_length = max_history_length

    async def load_history(self, inputs: RecommendInputs) -> list[common_pb2.HistoryItem]:
        """The request's own history (stateless clients), else the stored one (oldest first)."""
        if inputs.history is not None:
            return list(inputs.history[-self.max_history_length :])
        if not inputs.user_id:
            return []
        events = await self.history_store.history(inputs.user_id, self.max_history_length)
        return [
            common_pb2.HistoryItem(item_id=e.item_id, type=e.event_type, timestamp_ms=e.timestamp_ms)
            for e in events
        ]

    async def run(self, inputs: RecommendInputs, deadline: float) -> RecommendResult:
        """Serve one request; ``deadline`` is a ``time.monotonic()`` instant."""
        scenario = inputs.scenario
        name = scenario.name
        result = RecommendResult(items=[])
        started = time.perf_counter()

        def timed(stage: str, since: float) -> float:
            now = time.perf_counter()
            result.timings_ms[stage] = (now - since) * 1000
            self.metrics.stage_seconds.labels(name, stage).observe(now - since)
            return now

        try:
            history = await self.load_history(inputs)
        except Exception as error:  # the store is down: serve the user as a cold start
            log.warning("history store failed, serving without history: %r", error)
            result.degraded_reasons.append("history_unavailable")
            history = []
        mark = timed("history", started)

        candidates = await self._recall(inputs, history, deadline, result)
        self.metrics.candidates.labels(name, "recall").observe(len(candidates))
        mark = timed("recall", mark)

        if scenario.rank is not None and candidates:
            candidates = await self._rank(inputs, history, candidates, deadline, result)
            self.metrics.candidates.labels(name, "rank").observe(len(candidates))
            mark = timed("rank", mark)

        if scenario.rerank is not None:
            rerank_inputs = RerankInputs(
                history=history, context_item_ids=inputs.context_item_ids, now_ms=int(time.time() * 1000)
            )
            candidates = apply_rules(scenario.rerank.rules, candidates, rerank_inputs)
            self.metrics.candidates.labels(name, "rerank").observe(len(candidates))
            mark = timed("rerank", mark)

        result.items = candidates[: inputs.num_items]
        timed("total", started)
        for reason in result.degraded_reasons:
            self.metrics.fallbacks.labels(name, reason).inc()
        return result

    async def _recall(
        self,
        inputs: RecommendInputs,
        history: list[common_pb2.HistoryItem],
        deadline: float,
        result: RecommendResult,
    ) -> list[CandidateItem]:
        scenario = inputs.scenario
        stage = scenario.recall
        rank_ms = scenario.rank.timeout_ms if scenario.rank is not None else 0.0
        remaining = deadline - time.monotonic()
        # The recall stage gets its configured budget, or its proportional share of what is left.
        timeout = min(stage.timeout_ms / 1000, remaining * stage.timeout_ms / (stage.timeout_ms + rank_ms))
        seeds = seed_items(stage, inputs.context_item_ids, history)
        request = recall_pb2.RecallRequest(
            request_id=inputs.request_id,
            user_id=inputs.user_id,
            scenario=scenario.model_scenario_name,
            history=history,
            seed_item_ids=seeds,
            sources=[recall_pb2.SourceQuota(source=s, k=k) for s, k in recall_sources(stage, seeds)],
            k=stage.k,
            filters=recall_pb2.RecallFilters(
                exclude_history=stage.exclude_history,
                exclude_item_ids=list(inputs.context_item_ids) if stage.exclude_context else [],
                category=inputs.context_category if stage.category_from_context else "",
                sponsored_only=stage.sponsored_only,
            ),
        )
        try:
            if timeout <= 0:
                raise TimeoutError("no time left for recall")
            response = await self.recall.Recall(request, timeout=timeout)
        except (grpc.aio.AioRpcError, TimeoutError) as error:
            reason = _failure_reason("recall", error)
            if not self.popular_cache.candidates:
                raise PipelineUnavailable(
                    f"recall failed ({reason}) and no popular table is cached"
                ) from error
            log.warning(
                "recall failed, serving the cached popular table",
                extra={"scenario": scenario.name, "reason": reason},
            )
            result.degraded_reasons.append(reason)
            history_ids = {entry.item_id for entry in history}
            return self.popular_cache.select(
                stage, history_ids, inputs.context_item_ids, inputs.context_category
            )
        result.model_versions["recall"] = response.model_version
        return [_candidate_item(candidate) for candidate in response.candidates]

    async def _rank(
        self,
        inputs: RecommendInputs,
        history: list[common_pb2.HistoryItem],
        candidates: list[CandidateItem],
        deadline: float,
        result: RecommendResult,
    ) -> list[CandidateItem]:
        stage = inputs.scenario.rank
        assert stage is not None
        to_rank, rest = candidates[: stage.max_candidates], candidates[stage.max_candidates :]
        timeout = min(stage.timeout_ms / 1000, deadline - time.monotonic() - RESERVE_S)
        request = rank_pb2.RankRequest(
            request_id=inputs.request_id,
            user_id=inputs.user_id,
            scenario=inputs.scenario.model_scenario_name,
            history=history,
            candidates=[
                rank_pb2.RankCandidate(
                    item_id=c.item_id,
                    recall_score=c.recall_score,
                    source=c.source,
                    source_scores=c.source_scores,
                )
                for c in to_rank
            ],
            debug=inputs.debug,
        )
        try:
            if timeout <= 0:
                raise TimeoutError("no time left for rank")
            response = await self.rank.Rank(request, timeout=timeout)
            if len(response.results) != len(to_rank):
                raise ValueError(
                    f"rank returned {len(response.results)} scores for {len(to_rank)} candidates"
                )
        except (grpc.aio.AioRpcError, TimeoutError, ValueError) as error:
            reason = _failure_reason("rank", error)
            log.warning(
                "rank failed, serving the recall order",
                extra={"scenario": inputs.scenario.name, "reason": reason},
            )
            result.degraded_reasons.append(reason)
            return candidates
        result.model_versions["rank"] = response.model_version
        for candidate, ranked in zip(to_rank, response.results, strict=True):
            candidate.rank_score = ranked.score
            candidate.score = ranked.score
            candidate.attended_item_ids = list(ranked.attended_item_ids)
        # Stable sort: ties keep the recall order. Candidates beyond max_candidates follow.
        return sorted(to_rank, key=lambda c: c.rank_score, reverse=True) + rest


def explanation(item: CandidateItem) -> str:
    """A one-line human reason for a debug response."""
    sources = (
        ", ".join(
            f"{source} {score:.3f}"
            for source, score in sorted(item.source_scores.items(), key=lambda kv: -kv[1])
        )
        or item.source
    )
    parts = [f"recall: {sources}"]
    if item.rank_score is not None:
        parts.append(f"rank score {item.rank_score:.3f}")
    if item.attended_item_ids:
        parts.append(f"attended to {', '.join(item.attended_item_ids)}")
    if item.bid > 0:
        parts.append(f"bid {item.bid:.3f}")
    return "; ".join(parts)


def to_scored_item(item: CandidateItem, debug: bool) -> gateway_pb2.ScoredItem:
    """The wire form of one result."""
    scored = gateway_pb2.ScoredItem(item_id=item.item_id, score=item.score, source=item.source)
    if debug:
        scored.explanation = explanation(item)
        scored.recall_score = item.recall_score
        if item.rank_score is not None:
            scored.rank_score = item.rank_score
        scored.sources.extend(sorted(item.source_scores) or [item.source])
        scored.attended_item_ids.extend(item.attended_item_ids)
    return scored
