"""`RankService.Rank`: validate the packed request, micro-batch into the runtime, answer packed scores.

The request carries catalog indices and recall's per-source scores as packed arrays (see
protos/recsys/v1/rank.proto); decoding is a few ``np.frombuffer`` calls and the answer one
``float32`` array in request order, whatever the number of candidates. ``RankBatch`` answers
several such requests of one caller in one call, each as its own ``Rank``
(:mod:`recsys.serving.batch_calls`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from rank_service.features import SOURCES
from rank_service.runtime import RankQuery, RankRuntime
from recsys.data.dataset import EventType
from recsys.serving.batch_calls import answer_batch
from recsys.serving.batching import (
    DEFAULT_MAX_QUEUE,
    BatcherMetrics,
    MicroBatcher,
    call_deadline,
)
from recsys.serving.metrics import get_or_create
from recsys.serving.reload import BundleWatcher
from recsys.serving.validation import InvalidArgument, grpc_method, require, require_id
from recsys.serving.wire import (
    FLAGS,
    INDEX,
    SCORE,
    catalog_fingerprint,
    check_catalog,
    flags_to_mask,
    pack,
    unpack,
    unpack_indices,
    unpack_scores,
)
from recsys.v1 import rank_pb2, rank_pb2_grpc

MAX_CANDIDATES = 5000
MAX_HISTORY_ITEMS = 1000
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
EVENT_TYPE_MAX = max(int(event) for event in EventType)
SOURCE_COLUMN = {name: column for column, name in enumerate(SOURCES)}


@dataclass(frozen=True)
class RankModel:
    """One loaded bundle and its catalog fingerprint: swapped as a whole, so a request is
    validated, scored and answered (version, catalog) by the same bundle."""

    runtime: RankRuntime
    catalog: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "catalog", catalog_fingerprint(self.runtime.items.ids))

    @property
    def version(self) -> str:
        return self.runtime.version


@dataclass
class ScoreJob:
    """One validated request inside a micro-batch, bound to the model it was validated against."""

    query: RankQuery
    debug: bool
    model: RankModel


class RankMetrics:
    def __init__(self, registry: CollectorRegistry):
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


def parse_request(request: rank_pb2.RankRequest, runtime: RankRuntime, catalog: str) -> RankQuery:
    """Validate a RankRequest and decode it into a RankQuery.

    Raises InvalidArgument naming the first bad field, CatalogMismatch when the request was built
    for another catalog than ``catalog`` (the rank bundle's).
    """
    require(bool(request.catalog), "catalog", "must name the catalog the indices refer to")
    check_catalog(catalog, request.catalog)
    require(bool(request.scenario), "scenario", "must not be empty")
    require_id(request.user_id, "user_id", allow_empty=True)
    scenario = runtime.scenario_id(request.scenario)
    require(scenario >= 0, "scenario", f"unknown scenario (known: {', '.join(runtime.scenarios)})")
    num_items = len(runtime.items)
    candidates = unpack_indices(request.candidate_items, "candidate_items", num_items)
    count = len(candidates)
    require(
        0 < count <= MAX_CANDIDATES, "candidate_items", f"must have 1..{MAX_CANDIDATES} items, got {count}"
    )
    history = unpack_indices(request.history_items, "history_items", num_items)
    require(
        len(history) <= MAX_HISTORY_ITEMS,
        "history_items",
        f"must have at most {MAX_HISTORY_ITEMS} items, got {len(history)}",
    )
    events = None
    if request.history_types:
        events = unpack(request.history_types, FLAGS, "history_types", len(history))
        require(
            int(events.max(initial=0)) <= EVENT_TYPE_MAX,
            "history_types",
            f"event types must be in 0..{EVENT_TYPE_MAX}",
        )
    recall_scores = unpack_scores(request.recall_scores, "recall_scores", count)
    names = list(request.source_names)
    columns = []
    for position, name in enumerate(names):
        column = SOURCE_COLUMN.get(name)
        if column is None:
            raise InvalidArgument(
                f"source_names[{position}]", f"unknown source (known: {', '.join(SOURCES)})"
            )
        require(column not in columns, f"source_names[{position}]", f"source {name!r} given twice")
        columns.append(column)
    source_scores = np.zeros((count, len(SOURCES)), dtype=np.float32)
    source_mask = np.zeros((count, len(SOURCES)), dtype=bool)
    if names:
        given = unpack_scores(request.source_scores, "source_scores", count * len(names))
        flags = unpack(request.source_flags, FLAGS, "source_flags", count)
        mask = flags_to_mask(flags, len(names))
        source_mask[:, columns] = mask
        source_scores[:, columns] = np.where(mask, given.reshape(count, len(names)), np.float32(0.0))
    else:
        require(not request.source_scores, "source_scores", "given without source_names")
    return RankQuery(
        history=history.astype(np.int64),
        event_types=None if events is None else events.astype(np.int64),
        scenario=scenario,
        candidates=candidates.astype(np.int64),
        recall_scores=recall_scores,
        source_scores=source_scores,
        source_mask=source_mask,
    )


class RankServicer(rank_pb2_grpc.RankServiceServicer):
    """Thin gRPC layer over a RankRuntime with micro-batching."""

    def __init__(
        self,
        runtime: RankRuntime | RankModel,
        registry: CollectorRegistry,
        max_batch: int,
        max_wait_ms: float = 0.0,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ):
        self.model = runtime if isinstance(runtime, RankModel) else RankModel(runtime)
        self.bundle_watcher: BundleWatcher[RankModel] | None = None  # set by serve() when it watches
        self.metrics = RankMetrics(registry)
        batcher_metrics = BatcherMetrics(registry, "rank")
        self.batcher: MicroBatcher[ScoreJob, tuple[np.ndarray, np.ndarray | None]] = MicroBatcher(
            self._score_batch,
            max_batch,
            max_wait_ms,
            on_batch=self.metrics.batch_size.observe,
            max_queue=max_queue,
            on_queue_wait=batcher_metrics.observe_queue_wait,
            on_reject=batcher_metrics.count_rejection,
            thread_name="rank-batch",
        )

    @property
    def runtime(self) -> RankRuntime:
        """The served runtime (the newest swapped in)."""
        return self.model.runtime

    @property
    def catalog(self) -> str:
        """The served catalog's fingerprint."""
        return self.model.catalog

    def swap(self, model: RankModel) -> None:
        """Serve ``model`` from now on (one reference assignment on the event loop); requests
        already validated finish on the old one."""
        self.model = model

    def _score_batch(self, jobs: Sequence[ScoreJob]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per model in the batch (after a swap, jobs validated against the old model still run on
        it): one runtime call for the plain requests, one for the debug ones (they need weights)."""
        results: list[tuple[np.ndarray, np.ndarray | None] | None] = [None] * len(jobs)
        models = {id(job.model): job.model for job in jobs}
        for model_id, model in models.items():
            plain = [i for i, job in enumerate(jobs) if id(job.model) == model_id and not job.debug]
            debug = [i for i, job in enumerate(jobs) if id(job.model) == model_id and job.debug]
            if plain:
                scored = model.runtime.score([jobs[i].query for i in plain])
                for i, scores in zip(plain, scored, strict=True):
                    results[i] = (scores, None)
            if debug:
                explained = model.runtime.score([jobs[i].query for i in debug], attention=True)
                for i, (scores, attended) in zip(debug, explained, strict=True):
                    results[i] = (scores, attended)
        return results  # type: ignore[return-value]

    async def rank(
        self, request: rank_pb2.RankRequest, deadline: float | None = None
    ) -> rank_pb2.RankResponse:
        """Validate, score through the batcher and encode: the whole method without the transport
        (the in-process backend calls it directly). ``deadline`` is a ``loop.time()`` instant."""
        model = self.model  # read once: a swap during the call does not change its answer's bundle
        query = parse_request(request, model.runtime, model.catalog)
        scores, attended = await self.batcher.submit(ScoreJob(query, request.debug, model), deadline)
        response = rank_pb2.RankResponse(
            model_version=model.version, catalog=model.catalog, scores=pack(scores, SCORE)
        )
        if attended is not None:
            response.attended = pack(attended, INDEX)
        return response

    @grpc_method
    async def Rank(
        self, request: rank_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> rank_pb2.RankResponse:
        # CatalogMismatch and the batcher's refusals are StatusErrors: grpc_method answers their code.
        return await self.rank(request, call_deadline(context))

    @grpc_method
    async def RankBatch(
        self, request: rank_pb2.RankBatchRequest, context: grpc.aio.ServicerContext
    ) -> rank_pb2.RankBatchResponse:
        # Each request answered as its own Rank call (its own status); the batcher gets them together.
        responses, statuses = await answer_batch(
            request.requests, request.budgets_ms, call_deadline(context), self.rank, rank_pb2.RankResponse
        )
        return rank_pb2.RankBatchResponse(responses=responses, statuses=statuses)


def service_name() -> str:
    return rank_pb2.DESCRIPTOR.services_by_name["RankService"].full_name
