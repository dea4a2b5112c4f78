"""`RankService.Rank`: validate, micro-batch into the runtime, answer scores in request order."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from rank_service.features import SOURCES
from rank_service.runtime import RankQuery, RankRuntime
from recsys.data.dataset import EventType
from recsys.serving.batching import MicroBatcher
from recsys.serving.metrics import get_or_create
from recsys.serving.validation import InvalidArgument, grpc_method, require, require_id
from recsys.v1 import rank_pb2, rank_pb2_grpc

MAX_CANDIDATES = 5000
MAX_HISTORY_ITEMS = 1000
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EVENT_TYPES = frozenset(int(event) for event in EventType)
SOURCE_COLUMN = {name: column for column, name in enumerate(SOURCES)}


@dataclass
class ScoreJob:
    """One validated request inside a micro-batch."""

    query: RankQuery
    debug: bool


class RankMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.unknown_candidates: Counter = get_or_create(
            registry,
            "recsys_rank_unknown_candidates",
            lambda: Counter(
                "recsys_rank_unknown_candidates",
                "Candidates not in the rank bundle's catalog (given the lowest score)",
                registry=registry,
            ),
        )
        self.batch_size: Histogram = get_or_create(
            registry,
            "recsys_rank_batch_size",
            lambda: Histogram(
                "recsys_rank_batch_size",
                "Requests per ranker run (micro-batching)",
                buckets=BATCH_SIZE_BUCKETS,
                registry=registry,
            ),
        )


def parse_request(request: rank_pb2.RankRequest, runtime: RankRuntime) -> RankQuery:
    """Validate a RankRequest and turn it into a RankQuery (dense ids, -1 for unknown candidates).

    Raises InvalidArgument naming the first bad field.
    """
    require(bool(request.scenario), "scenario", "must not be empty")
    scenario = runtime.scenario_id(request.scenario)
    require(
        scenario >= 0,
        "scenario",
        f"unknown scenario {request.scenario!r} (known: {', '.join(runtime.scenarios)})",
    )
    count = len(request.candidates)
    require(0 < count <= MAX_CANDIDATES, "candidates", f"must have 1..{MAX_CANDIDATES} items, got {count}")
    require(
        len(request.history) <= MAX_HISTORY_ITEMS,
        "history",
        f"must have at most {MAX_HISTORY_ITEMS} items, got {len(request.history)}",
    )
    history_ids: list[str] = []
    events = np.empty(len(request.history), dtype=np.int64)
    for position, item in enumerate(request.history):
        require_id(item.item_id, f"history[{position}].item_id")
        require(item.type in EVENT_TYPES, f"history[{position}].type", f"unknown event type {item.type}")
        history_ids.append(item.item_id)
        events[position] = item.type
    candidate_ids: list[str] = []
    recall_scores = np.zeros(count, dtype=np.float32)
    source_scores = np.zeros((count, len(SOURCES)), dtype=np.float32)
    source_mask = np.zeros((count, len(SOURCES)), dtype=bool)
    for position, candidate in enumerate(request.candidates):
        field = f"candidates[{position}]"
        require_id(candidate.item_id, f"{field}.item_id")
        require(math.isfinite(candidate.recall_score), f"{field}.recall_score", "must be finite")
        candidate_ids.append(candidate.item_id)
        recall_scores[position] = candidate.recall_score
        for source, score in candidate.source_scores.items():
            column = SOURCE_COLUMN.get(source)
            if column is None:
                raise InvalidArgument(
                    f"{field}.source_scores", f"unknown source {source!r} (known: {', '.join(SOURCES)})"
                )
            require(math.isfinite(score), f"{field}.source_scores[{source}]", "must be finite")
            source_scores[position, column] = score
            source_mask[position, column] = True
        if candidate.source:
            column = SOURCE_COLUMN.get(candidate.source)
            if column is None:
                raise InvalidArgument(
                    f"{field}.source", f"unknown source {candidate.source!r} (known: {', '.join(SOURCES)})"
                )
            if not source_mask[position, column]:
                source_scores[position, column] = candidate.recall_score
                source_mask[position, column] = True
    return RankQuery(
        history=runtime.items.dense_many(history_ids),
        event_types=events,
        scenario=scenario,
        candidates=runtime.items.dense_many(candidate_ids),
        recall_scores=recall_scores,
        source_scores=source_scores,
        source_mask=source_mask,
    )


class RankServicer(rank_pb2_grpc.RankServiceServicer):
    """Thin gRPC layer over a RankRuntime with micro-batching."""

    def __init__(self, runtime: RankRuntime, registry: CollectorRegistry, max_batch: int, max_wait_ms: float):
        self.runtime = runtime
        self.metrics = RankMetrics(registry)
        self.batcher: MicroBatcher[ScoreJob, tuple[np.ndarray, np.ndarray | None]] = MicroBatcher(
            self._score_batch, max_batch, max_wait_ms, on_batch=self.metrics.batch_size.observe
        )

    def _score_batch(self, jobs: Sequence[ScoreJob]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """One runtime call for the plain requests, one for the debug ones (they need weights)."""
        results: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(jobs)
        plain = [i for i, job in enumerate(jobs) if not job.debug]
        debug = [i for i, job in enumerate(jobs) if job.debug]
        if plain:
            for i, scores in zip(plain, self.runtime.score([jobs[i].query for i in plain]), strict=True):
                results[i] = (scores, None)
        if debug:
            explained = self.runtime.score([jobs[i].query for i in debug], attention=True)
            for i, (scores, attended) in zip(debug, explained, strict=True):
                results[i] = (scores, attended)
        return results  # type: ignore[return-value]

    @grpc_method
    async def Rank(
        self, request: rank_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> rank_pb2.RankResponse:
        query = parse_request(request, self.runtime)
        scores, attended = await self.batcher.submit(ScoreJob(query, request.debug))
        unknown = int((query.candidates < 0).sum())
        if unknown:
            self.metrics.unknown_candidates.inc(unknown)
        response = rank_pb2.RankResponse(model_version=self.runtime.version, unknown_candidates=unknown)
        for position, candidate in enumerate(request.candidates):
            result = response.results.add(item_id=candidate.item_id, score=float(scores[position]))
            if attended is not None:
                result.attended_item_ids.extend(
                    request.history[int(index)].item_id for index in attended[position] if index >= 0
                )
        return response


def service_name() -> str:
    return rank_pb2.DESCRIPTOR.services_by_name["RankService"].full_name
