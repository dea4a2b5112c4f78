"""``RecallService.Recall``: validate, translate ids, micro-batch into the engine, answer."""

from __future__ import annotations

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from recall_service.engine import SOURCES, CandidateList, RecallEngine, RecallQuery
from recsys.serving.batching import MicroBatcher
from recsys.serving.metrics import get_or_create
from recsys.serving.validation import InvalidArgument, grpc_method, require, require_id, require_in_range
from recsys.v1 import recall_pb2, recall_pb2_grpc

MAX_K = 10_000
MAX_HISTORY = 1_000
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class RecallMetrics:
    """The recall service's own metrics (on top of the bootstrap's RED metrics)."""

    def __init__(self, registry: CollectorRegistry):
        self.unknown_history_items: Counter = get_or_create(
            registry,
            "recsys_recall_unknown_history_items",
            lambda: Counter(
                "recsys_recall_unknown_history_items",
                "History item ids not in the recall bundle's catalog (skipped)",
                registry=registry,
            ),
        )
        self.batch_size: Histogram = get_or_create(
            registry,
            "recsys_recall_batch_size",
            lambda: Histogram(
                "recsys_recall_batch_size",
                "Requests per engine call (micro-batching)",
                buckets=BATCH_SIZE_BUCKETS,
                registry=registry,
            ),
        )


class RecallServicer(recall_pb2_grpc.RecallServiceServicer):
    """Thin gRPC layer over a :class:`RecallEngine` shared through a :class:`MicroBatcher`."""

    def __init__(
        self, engine: RecallEngine, batcher: MicroBatcher[RecallQuery, CandidateList], metrics: RecallMetrics
    ):
        self.engine = engine
        self.batcher = batcher
        self.metrics = metrics
        self._scenarios = {name: index for index, name in enumerate(engine.scenarios)}
        self._categories = {name: index for index, name in enumerate(engine.category_names)}
        # Per item (dense id): its category and brand names, "" when unknown.
        self._item_category = [
            engine.category_names[c] if c >= 0 else "" for c in engine.item_category.tolist()
        ]
        self._item_brand = [engine.brand_names[b] if b >= 0 else "" for b in engine.item_brand.tolist()]

    def to_query(self, request: recall_pb2.RecallRequest) -> tuple[RecallQuery, int]:
        """Validate ``request`` and translate it to dense ids; returns (query, unknown history ids).

        Raises InvalidArgument naming the first bad field.
        """
        require_id(request.user_id, "user_id", allow_empty=True)
        require_in_range(request.k, "k", 1, MAX_K)
        require(
            request.scenario in self._scenarios,
            "scenario",
            f"unknown scenario {request.scenario!r}; known: {', '.join(self.engine.scenarios)}",
        )
        require(
            len(request.history) <= MAX_HISTORY,
            "history",
            f"at most {MAX_HISTORY} items, got {len(request.history)}",
        )
        quotas: dict[str, int] = {}
        for position, quota in enumerate(request.sources):
            field = f"sources[{position}]"
            require(
                quota.source in SOURCES,
                f"{field}.source",
                f"unknown source {quota.source!r}; known: {', '.join(SOURCES)}",
            )
            require(quota.source not in quotas, f"{field}.source", f"source {quota.source!r} given twice")
            require_in_range(quota.k, f"{field}.k", 0, MAX_K)
            quotas[quota.source] = quota.k  # 0 = up to k
        category = -1
        if request.filters.category:
            require(
                request.filters.category in self._categories,
                "filters.category",
                f"unknown category {request.filters.category!r}",
            )
            category = self._categories[request.filters.category]

        items = self.engine.items
        history_ids = items.dense_many([h.item_id for h in request.history])
        known = history_ids >= 0
        event_types = np.fromiter(
            (h.type for h in request.history), dtype=np.int64, count=len(request.history)
        )
        seeds = items.dense_many(list(request.seed_item_ids))
        excluded = items.dense_many(list(request.filters.exclude_item_ids))
        query = RecallQuery(
            history=history_ids[known],
            event_types=event_types[known],
            scenario=self._scenarios[request.scenario],
            seed_items=seeds[seeds >= 0],
            quotas=quotas,
            k=request.k,
            exclude_history=request.filters.exclude_history,
            exclude_items=excluded[excluded >= 0],
            category=category,
            sponsored_only=request.filters.sponsored_only,
        )
        return query, int((~known).sum())

    def to_response(self, candidates: CandidateList, unknown: int) -> recall_pb2.RecallResponse:
        """The wire response; plain Python lists avoid per-field numpy scalar conversions."""
        engine = self.engine
        items = candidates.items.tolist()
        scores = candidates.scores.tolist()
        bids = engine.item_bid[candidates.items].tolist()
        source_scores = candidates.source_scores.tolist()
        source_mask = candidates.source_mask.tolist()
        messages = [
            recall_pb2.Candidate(
                item_id=engine.items.ids[item],
                score=scores[row],
                source=candidates.sources[row],
                source_scores={
                    name: value
                    for name, value, present in zip(
                        SOURCES, source_scores[row], source_mask[row], strict=True
                    )
                    if present
                },
                category=self._item_category[item],
                brand=self._item_brand[item],
                bid=bids[row],
            )
            for row, item in enumerate(items)
        ]
        response = recall_pb2.RecallResponse(model_version=engine.version, unknown_history_items=unknown)
        response.candidates.extend(messages)
        return response

    @grpc_method
    async def Recall(
        self, request: recall_pb2.RecallRequest, context: grpc.aio.ServicerContext
    ) -> recall_pb2.RecallResponse:
        query, unknown = self.to_query(request)
        if unknown:
            self.metrics.unknown_history_items.inc(unknown)
        candidates = await self.batcher.submit(query)
        return self.to_response(candidates, unknown)


__all__ = ["InvalidArgument", "RecallMetrics", "RecallServicer"]
