"""The stages a scenario is made of. Each stage is one class that parses its settings from the
scenario file, declares what it ``needs`` and ``produces`` (checked in order when the file loads,
see :func:`recsys.scenario.config.check_pipeline`) and ``run``-s itself on a request.

- :class:`RecallStage` asks the recall backend for packed candidates (sources with quotas,
  seeds, filters); when recall is slow, down or on another catalog it serves the catalog's
  popularity order, filtered the same way, and marks the answer degraded.
- :class:`RankStage` sends the first ``max_candidates`` to the rank backend and orders them by its
  scores; when rank fails the recall order stays, degraded.
- :class:`RerankStage` applies its rules (:mod:`recsys.scenario.rules`) in order.

Backends are anything with the gRPC stubs' async methods: the stubs online, the in-process
servicers offline, so a scenario runs the same way in the gateway and in ``recsys eval``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import grpc
import numpy as np

from recsys.scenario.candidates import Candidates, History
from recsys.scenario.catalog import Catalog
from recsys.scenario.context import CatalogMismatchError, StageContext
from recsys.scenario.rules import RerankInputs, RerankRule, apply_rules, parse_rule
from recsys.scenario.spec import ScenarioConfigError, boolean, fields, integer, number
from recsys.serving.tracing import outgoing_metadata
from recsys.serving.wire import FLAGS, INDEX, SCORE, flags_to_mask, pack, unpack
from recsys.sources import RECALL_SOURCES, SOURCE_INDEX
from recsys.v1 import common_pb2, rank_pb2, recall_pb2

log = logging.getLogger(__name__)
Response = TypeVar("Response")

# Where recall's seed items may come from, tried in the declared order (first non-empty wins).
SEED_SOURCES = ("context.item_ids", "history.cart", "history.recent")
MAX_SEEDS = 10
RESERVE_S = 0.002  # kept back from the last downstream call for re-rank and the response
ATTENDED_TOP = 3


@dataclass(frozen=True)
class RecallStage:
    """Ask the recall backend for ``k`` candidates from the named sources."""

    sources: tuple[tuple[str, int], ...]  # (source, quota) in declared order; () = recall's default mix
    k: int
    seeds: tuple[str, ...] = ()  # seed sources for i2i/covisit, first non-empty wins
    exclude_history: bool = False
    exclude_context: bool = False  # pass context.item_ids as exclude_item_ids
    category_from_context: bool = False  # restrict to context.category
    sponsored_only: bool = False
    timeout_ms: float = 150.0

    kind: ClassVar[str] = "recall"

    @classmethod
    def parse(cls, spec: Any, where: str) -> RecallStage:
        spec = fields(spec, where, {"sources", "k", "seeds", "filters", "timeout_ms"})
        sources_spec = spec.get("sources", "default")
        sources = []
        if sources_spec != "default":  # "default": the recall bundle's own source mix for the scenario
            if not isinstance(sources_spec, Mapping) or not sources_spec:
                raise ScenarioConfigError(
                    f"{where}: sources must map source -> quota (e.g. {{u2i: 200}}) or be 'default'"
                )
            for source, quota in sources_spec.items():
                if source not in RECALL_SOURCES:
                    raise ScenarioConfigError(
                        f"{where}: unknown source {source!r}; known: {list(RECALL_SOURCES)}"
                    )
                sources.append((source, integer(quota, where, f"sources.{source}", 1, 10_000)))
        if "k" not in spec and not sources:
            raise ScenarioConfigError(f"{where}: k is required with the default sources")
        k = integer(spec.get("k", sum(q for _, q in sources)), where, "k", 1, 10_000)
        seeds_spec = spec.get("seeds", [])
        if not isinstance(seeds_spec, str | list):
            raise ScenarioConfigError(
                f"{where}: seeds must be one of {list(SEED_SOURCES)} or a list of them, got {seeds_spec!r}"
            )
        seeds = (seeds_spec,) if isinstance(seeds_spec, str) else tuple(seeds_spec)
        for seed in seeds:
            if seed not in SEED_SOURCES:
                raise ScenarioConfigError(f"{where}: unknown seeds {seed!r}; known: {list(SEED_SOURCES)}")
        if "i2i" in dict(sources) and not seeds:
            raise ScenarioConfigError(
                f"{where}: source i2i needs seed items: set seeds (e.g. [context.item_ids])"
            )
        filters = fields(
            spec.get("filters"),
            f"{where}, filters",
            {"exclude_history", "exclude_context", "category", "sponsored_only"},
        )
        category = filters.get("category")
        if category not in (None, "context"):
            raise ScenarioConfigError(f"{where}: filters.category must be 'context' (the request's category)")
        return cls(
            sources=tuple(sources),
            k=k,
            seeds=seeds,
            exclude_history=boolean(filters.get("exclude_history", False), where, "filters.exclude_history"),
            exclude_context=boolean(filters.get("exclude_context", False), where, "filters.exclude_context"),
            category_from_context=category == "context",
            sponsored_only=boolean(filters.get("sponsored_only", False), where, "filters.sponsored_only"),
            timeout_ms=number(spec.get("timeout_ms", 150), where, "timeout_ms", 1, 60_000),
        )

    def needs(self) -> tuple[set[str], set[str]]:
        """(required, optional) keys this stage reads."""
        required: set[str] = set()
        optional = {"history", "user_id"}
        if len(self.seeds) == 1 and self.seeds[0] == "context.item_ids":
            required.add("context.item_ids")
        elif "context.item_ids" in self.seeds:
            optional.add("context.item_ids")
        if self.exclude_context:
            optional.add("context.item_ids")
        if self.category_from_context:
            required.add("context.category")
        return required, optional

    def produces(self) -> set[str]:
        produced = {"candidates", "attributes"}
        if self.sponsored_only:
            produced.add("bids")
        return produced

    def request(self, context: StageContext) -> recall_pb2.RecallRequest:
        """The packed recall request this stage sends for ``context``."""
        inputs, catalog, history = context.inputs, context.catalog, context.history
        context_items = context.context_items
        seeds = seed_items(self, inputs.context_item_ids, history)
        seed_indices = catalog.indices(seeds)
        history_items, history_types = history.packed
        return recall_pb2.RecallRequest(
            request_id=inputs.request_id,
            user_id=inputs.user_id,
            scenario=inputs.scenario.model_scenario_name,
            catalog=catalog.fingerprint,
            history_items=history_items,
            history_types=history_types,
            seed_items=pack(seed_indices[seed_indices >= 0], INDEX),
            sources=[recall_pb2.SourceQuota(source=s, k=k) for s, k in recall_sources(self, seeds)],
            k=self.k,
            filters=recall_pb2.RecallFilters(
                exclude_history=self.exclude_history,
                exclude_items=pack(context_items[context_items >= 0], INDEX) if self.exclude_context else b"",
                category=inputs.context_category if self.category_from_context else "",
                sponsored_only=self.sponsored_only,
            ),
        )

    async def run(self, context: StageContext, candidates: Candidates) -> Candidates:
        """Recall's candidates; the popular fallback (degraded) when recall cannot answer."""
        scenario = context.inputs.scenario
        rank = scenario.rank
        rank_ms = rank.timeout_ms if rank is not None else 0.0
        remaining = context.deadline - time.monotonic()
        # The recall stage gets its configured budget, or its proportional share of what is left.
        timeout = min(self.timeout_ms / 1000, remaining * self.timeout_ms / (self.timeout_ms + rank_ms))
        request = self.request(context)
        try:
            response = await call_downstream(context.backends.recall.Recall, request, timeout, "recall")
            recalled = decode_recall(response, context.catalog)
        except (grpc.aio.AioRpcError, TimeoutError, ValueError, CatalogMismatchError) as error:
            reason = failure_reason("recall", error)
            if reason.endswith("catalog_mismatch"):
                context.on_catalog_mismatch()
            log.warning(
                "recall failed, serving the popular fallback",
                extra={"scenario": scenario.name, "reason": reason},
            )
            context.result.degraded_reasons.append(reason)
            return popular_fallback(
                context.catalog,
                self,
                context.history,
                context.context_items,
                context.category,
                context.fallback_depth,
            )
        # A sharded recall answers with the shards that could (recall_shard_unavailable).
        context.result.degraded_reasons.extend(response.degraded_reasons)
        context.result.model_versions["recall"] = response.model_version
        return recalled


@dataclass(frozen=True)
class RankStage:
    """Score the first ``max_candidates`` candidates with the ranker and order them by its scores."""

    max_candidates: int
    timeout_ms: float = 150.0

    kind: ClassVar[str] = "rank"

    @classmethod
    def parse(cls, spec: Any, where: str) -> RankStage:
        spec = fields(spec, where, {"max_candidates", "timeout_ms"})
        return cls(
            max_candidates=integer(spec.get("max_candidates", 300), where, "max_candidates", 1, 5000),
            timeout_ms=number(spec.get("timeout_ms", 150), where, "timeout_ms", 1, 60_000),
        )

    def needs(self) -> tuple[set[str], set[str]]:
        return {"candidates"}, {"history", "user_id"}

    def produces(self) -> set[str]:
        return {"rank_scores"}

    async def run(self, context: StageContext, candidates: Candidates) -> Candidates:
        """``candidates`` ordered by the ranker (the first ``max_candidates``; the rest follow,
        unranked); the input order (degraded) when rank cannot answer."""
        if not len(candidates):
            return candidates
        inputs, catalog, result = context.inputs, context.catalog, context.result
        to_rank = candidates.head(self.max_candidates)
        count = len(to_rank)
        timeout = min(self.timeout_ms / 1000, context.deadline - time.monotonic() - RESERVE_S)
        history_items, history_types = context.history.packed
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
            response = await call_downstream(context.backends.rank.Rank, request, timeout, "rank", catalog)
            scores = unpack(response.scores, SCORE, "scores", count)
            if not np.isfinite(scores).all():
                raise ValueError("rank returned non-finite scores")
            attended = None
            if inputs.debug and response.attended:
                attended = unpack(response.attended, INDEX, "attended", count * ATTENDED_TOP)
                attended = attended.reshape(count, ATTENDED_TOP)
        except (grpc.aio.AioRpcError, TimeoutError, ValueError, CatalogMismatchError) as error:
            reason = failure_reason("rank", error)
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


@dataclass(frozen=True)
class RerankStage:
    """Business rules applied in order to the ranked list."""

    rules: tuple[RerankRule, ...]

    kind: ClassVar[str] = "rerank"

    @classmethod
    def parse(cls, spec: Any, where: str) -> RerankStage:
        if not isinstance(spec, list) or not spec:
            raise ScenarioConfigError(f"{where}: expected a non-empty list of rules")
        return cls(rules=tuple(parse_rule(rule, where) for rule in spec))

    def needs(self) -> tuple[set[str], set[str]]:
        required: set[str] = set()
        optional: set[str] = set()
        for rule in self.rules:
            required |= set(rule.needs)
            optional |= set(rule.reads)
        return required, optional

    def produces(self) -> set[str]:
        return set()

    async def run(self, context: StageContext, candidates: Candidates) -> Candidates:
        context_items = context.context_items
        inputs = RerankInputs(
            catalog=context.catalog,
            history=context.history,
            context_items=context_items[context_items >= 0],
            now_ms=int(time.time() * 1000),
        )
        return apply_rules(self.rules, candidates, inputs)

    def without(self, rule_name: str) -> RerankStage | None:
        """This stage without the rules named ``rule_name`` (None when none is left)."""
        rules = tuple(rule for rule in self.rules if rule.name != rule_name)
        return RerankStage(rules) if rules else None


Stage = RecallStage | RankStage | RerankStage
STAGES: Mapping[str, type[Stage]] = {stage.kind: stage for stage in (RecallStage, RankStage, RerankStage)}


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
    ``stage.k``: what is served when recall cannot answer."""
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


async def call_downstream(
    method: Callable[..., Awaitable[Response]],
    request: Any,
    timeout: float,
    service: str,
    catalog: Catalog | None = None,
) -> Response:
    """``method(request)`` (a stub's RPC) under ``timeout`` seconds with the outgoing trace
    metadata: TimeoutError without calling when no time is left, CatalogMismatchError when the
    answer names another catalog than ``catalog`` (when given)."""
    if timeout <= 0:
        raise TimeoutError(f"no time left for {service}")
    response = await method(request, timeout=timeout, metadata=outgoing_metadata())
    if catalog is not None:
        require_catalog(response.catalog, catalog, service)
    return response


def require_catalog(answered: str, catalog: Catalog, service: str) -> None:
    """CatalogMismatchError unless ``service`` answered for ``catalog``."""
    if answered != catalog.fingerprint:
        raise CatalogMismatchError(f"{service} answered for catalog {answered[:16]!r}")


def decode_recall(response: recall_pb2.RecallResponse, catalog: Catalog) -> Candidates:
    """Recall's packed answer as Candidates in the canonical source order; ValueError when malformed."""
    require_catalog(response.catalog, catalog, "recall")
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


def failure_reason(stage: str, error: BaseException) -> str:
    """The degraded reason of a failed downstream call, e.g. ``rank_deadline_exceeded``."""
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
