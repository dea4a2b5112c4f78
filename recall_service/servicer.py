"""``RecallService``: validate the packed request, micro-batch into the engine, answer packed arrays.

``Recall`` speaks catalog indices (see protos/recsys/v1/recall.proto): decoding a request is a few
``np.frombuffer`` calls and encoding the answer a few ``tobytes``, whatever the number of
candidates. ``RecallBatch`` answers several such requests of one caller in one call, each as its
own ``Recall`` (:mod:`recsys.serving.batch_calls`). A request with ``source_lists`` (a fan-out
over recall shards) is answered each source's list unmerged instead (:mod:`recsys.recall_merge`).
``GetCatalog`` streams the catalog (ids, attributes, popularity order) the indices refer to, so
the gateway can translate to and from external item ids; every shard serves the whole catalog.
``UserProfile`` (the gateway's GetUserProfile) answers the category and brand centroids nearest
the user embedding: the same batcher and batched user-tower run as Recall, the centroids held by
the served bundle's engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Histogram

from recall_service.ann_quality import AnnQualityMonitor
from recall_service.engine import SOURCES, CandidateList, NearestAttributes, RecallEngine, RecallQuery
from recsys.data.dataset import EventType
from recsys.recall_merge import SourceLists, candidates_response, source_lists_response
from recsys.serving.batch_calls import answer_batch
from recsys.serving.batching import MicroBatcher, call_deadline
from recsys.serving.metrics import get_or_create
from recsys.serving.reload import BundleWatcher
from recsys.serving.validation import InvalidArgument, grpc_method, require, require_id, require_in_range
from recsys.serving.wire import (
    FLAGS,
    INDEX,
    SCORE,
    catalog_fingerprint,
    check_catalog,
    pack,
    unpack,
    unpack_indices,
)
from recsys.v1 import recall_pb2, recall_pb2_grpc

MAX_K = 10_000
MAX_TOP_N = 100  # UserProfile: clusters per kind
MAX_HISTORY = 1_000
MAX_SEEDS = 1_000
MAX_EXCLUDED = 10_000
CATALOG_CHUNK = 50_000  # items per GetCatalog message (~1-2 MB)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
EVENT_TYPE_MAX = max(int(event) for event in EventType)


class RecallMetrics:
    """The recall service's own metrics (on top of the bootstrap's RED metrics)."""

    def __init__(self, registry: CollectorRegistry):
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


@dataclass(frozen=True)
class RecallModel:
    """One loaded bundle and what validation derives from it: swapped as a whole, so a request is
    validated, computed and answered (version, catalog) by the same bundle."""

    engine: RecallEngine
    catalog: str = field(init=False)
    scenarios: dict[str, int] = field(init=False)
    categories: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        engine = self.engine
        object.__setattr__(self, "catalog", catalog_fingerprint(engine.items.ids))
        object.__setattr__(self, "scenarios", {name: i for i, name in enumerate(engine.scenarios)})
        object.__setattr__(self, "categories", {name: i for i, name in enumerate(engine.category_names)})
        # The UserProfile centroids are computed here, where a bundle is loaded (a thread, during a
        # hot swap), not by the first UserProfile call on the batcher's thread that Recall shares.
        _ = engine.category_centroids, engine.brand_centroids

    @property
    def version(self) -> str:
        return self.engine.version


@dataclass
class RecallJob:
    """A validated query bound to the model it was validated against (it runs on that one);
    ``source_lists``: answer the unmerged lists (a shard asked by a fan-out); ``nearest_top_n``
    > 0: answer that many nearest category and brand centroids instead (UserProfile)."""

    model: RecallModel
    query: RecallQuery
    source_lists: bool = False
    nearest_top_n: int = 0

    @property
    def answer_form(self) -> str:
        if self.nearest_top_n > 0:
            return "nearest"
        return "source_lists" if self.source_lists else "candidates"


RecallResult = CandidateList | SourceLists | NearestAttributes


def run_recall_jobs(jobs: Sequence[RecallJob]) -> list[RecallResult]:
    """The batcher's run function: one engine call per model in the batch (after a swap, jobs
    validated against the old model still run on it), and per answer form."""
    results: list[RecallResult | None] = [None] * len(jobs)
    groups: dict[tuple[int, str], list[int]] = {}
    for position, job in enumerate(jobs):
        groups.setdefault((id(job.model), job.answer_form), []).append(position)
    for (_, form), positions in groups.items():
        engine = jobs[positions[0]].model.engine
        queries = [jobs[p].query for p in positions]
        answers: Sequence[RecallResult]
        if form == "nearest":
            answers = engine.nearest_attributes(queries, [jobs[p].nearest_top_n for p in positions])
        elif form == "source_lists":
            answers = engine.source_lists(queries)
        else:
            answers = engine.recall(queries)
        for position, answer in zip(positions, answers, strict=True):
            results[position] = answer
    return results  # type: ignore[return-value]


class RecallServicer(recall_pb2_grpc.RecallServiceServicer):
    """Thin gRPC layer over a :class:`RecallEngine` shared through a :class:`MicroBatcher`.

    ``model`` is the served bundle; :meth:`swap` replaces it (hot reload). Each request reads it
    once, so its validation, computation and answer all come from one bundle. ``ann_quality``
    (when live ANN quality is sampled) follows the served engine.
    """

    def __init__(
        self,
        engine: RecallEngine | RecallModel,
        batcher: MicroBatcher[RecallJob, RecallResult],
        metrics: RecallMetrics,
        ann_quality: AnnQualityMonitor | None = None,
    ):
        self.model = engine if isinstance(engine, RecallModel) else RecallModel(engine)
        self.batcher = batcher
        self.metrics = metrics
        self.ann_quality = ann_quality
        if ann_quality is not None:
            ann_quality.follow(self.model.engine)
        self.bundle_watcher: BundleWatcher[RecallModel] | None = None  # set by serve() when it watches

    @property
    def engine(self) -> RecallEngine:
        """The served engine (the newest swapped in)."""
        return self.model.engine

    @property
    def catalog(self) -> str:
        """The served catalog's fingerprint."""
        return self.model.catalog

    def swap(self, model: RecallModel) -> None:
        """Serve ``model`` from now on (one reference assignment on the event loop); requests
        already validated finish on the old one."""
        self.model = model
        if self.ann_quality is not None:
            self.ann_quality.follow(model.engine)

    def to_query(self, request: recall_pb2.RecallRequest, model: RecallModel | None = None) -> RecallQuery:
        """Validate ``request`` against ``model`` (default: the served one) and decode its arrays;
        raises InvalidArgument naming the first bad field, CatalogMismatch when it was built for
        another catalog."""
        model = self.model if model is None else model
        require(bool(request.catalog), "catalog", "must name the catalog the indices refer to")
        check_catalog(model.catalog, request.catalog)
        require_id(request.user_id, "user_id", allow_empty=True)
        require_in_range(request.k, "k", 1, MAX_K)
        require(
            request.scenario in model.scenarios,
            "scenario",
            f"unknown scenario; known: {', '.join(model.engine.scenarios)}",
        )
        quotas: dict[str, int] = {}
        for position, quota in enumerate(request.sources):
            field = f"sources[{position}]"
            require(
                quota.source in SOURCES, f"{field}.source", f"unknown source; known: {', '.join(SOURCES)}"
            )
            require(quota.source not in quotas, f"{field}.source", f"source {quota.source!r} given twice")
            require_in_range(quota.k, f"{field}.k", 0, MAX_K)
            quotas[quota.source] = quota.k  # 0 = up to k
        category = -1
        if request.filters.category:
            category = model.categories.get(request.filters.category, -2)
            require(category >= 0, "filters.category", "unknown category")
        num_items = model.engine.num_items
        history, event_types = decode_history(request.history_items, request.history_types, num_items)
        seeds = unpack_indices(request.seed_items, "seed_items", num_items)
        require(len(seeds) <= MAX_SEEDS, "seed_items", f"at most {MAX_SEEDS} items, got {len(seeds)}")
        excluded = unpack_indices(request.filters.exclude_items, "filters.exclude_items", num_items)
        require(
            len(excluded) <= MAX_EXCLUDED,
            "filters.exclude_items",
            f"at most {MAX_EXCLUDED} items, got {len(excluded)}",
        )
        return RecallQuery(
            history=history,
            event_types=event_types,
            scenario=model.scenarios[request.scenario],
            seed_items=seeds.astype(np.int64),
            quotas=quotas,
            k=request.k,
            exclude_history=request.filters.exclude_history,
            exclude_items=excluded.astype(np.int64),
            category=category,
            sponsored_only=request.filters.sponsored_only,
        )

    def to_response(
        self, answer: RecallResult, model: RecallModel | None = None
    ) -> recall_pb2.RecallResponse:
        """The packed wire response of ``model`` (default: the served one): one array per column,
        whatever the number of candidates (or, for a fan-out, one per source list)."""
        model = self.model if model is None else model
        if isinstance(answer, SourceLists):
            engine = model.engine
            return source_lists_response(
                answer, model.catalog, model.version, engine.shard_index, engine.shard_count
            )
        response = candidates_response(answer, model.catalog, model.version)
        response.shard_index, response.shard_count = model.engine.shard_index, model.engine.shard_count
        return response

    async def recall(
        self, request: recall_pb2.RecallRequest, deadline: float | None = None
    ) -> recall_pb2.RecallResponse:
        """Validate, run through the batcher and encode: the whole method without the transport
        (the in-process backend calls it directly). ``deadline`` is a ``loop.time()`` instant."""
        model = self.model  # read once: a swap during the call does not change its answer's bundle
        job = RecallJob(model, self.to_query(request, model), source_lists=request.source_lists)
        return self.to_response(await self.batcher.submit(job, deadline), model)

    @grpc_method
    async def Recall(
        self, request: recall_pb2.RecallRequest, context: grpc.aio.ServicerContext
    ) -> recall_pb2.RecallResponse:
        # CatalogMismatch and the batcher's refusals are StatusErrors: grpc_method answers their code.
        return await self.recall(request, call_deadline(context))

    @grpc_method
    async def RecallBatch(
        self, request: recall_pb2.RecallBatchRequest, context: grpc.aio.ServicerContext
    ) -> recall_pb2.RecallBatchResponse:
        # Each request answered as its own Recall call (its own status); the batcher gets them together.
        responses, statuses = await answer_batch(
            request.requests,
            request.budgets_ms,
            call_deadline(context),
            self.recall,
            recall_pb2.RecallResponse,
        )
        return recall_pb2.RecallBatchResponse(responses=responses, statuses=statuses)

    def to_profile_job(
        self, request: recall_pb2.UserProfileRequest, model: RecallModel | None = None
    ) -> RecallJob:
        """Validate a UserProfile ``request`` against ``model`` (default: the served one): the job
        that computes its nearest centroids. InvalidArgument naming the first bad field,
        CatalogMismatch when it was built for another catalog."""
        model = self.model if model is None else model
        require(bool(request.catalog), "catalog", "must name the catalog the indices refer to")
        check_catalog(model.catalog, request.catalog)
        require_id(request.request_id, "request_id", allow_empty=True)
        require_in_range(request.top_n, "top_n", 1, MAX_TOP_N)
        scenario = request.scenario or ("home" if "home" in model.scenarios else model.engine.scenarios[0])
        require(
            scenario in model.scenarios,
            "scenario",
            f"unknown scenario; known: {', '.join(model.engine.scenarios)}",
        )
        history, event_types = decode_history(
            request.history_items, request.history_types, model.engine.num_items
        )
        query = RecallQuery(history=history, event_types=event_types, scenario=model.scenarios[scenario])
        return RecallJob(model, query, nearest_top_n=request.top_n)

    async def user_profile(
        self, request: recall_pb2.UserProfileRequest, deadline: float | None = None
    ) -> recall_pb2.UserProfileResponse:
        """Validate, run through the batcher (one user-tower run per batch, shared with Recall's
        queue and its shedding) and encode; ``deadline`` is a ``loop.time()`` instant."""
        model = self.model  # read once: the answer's centroids, names and version are one bundle's
        job = self.to_profile_job(request, model)
        nearest = await self.batcher.submit(job, deadline)
        assert isinstance(nearest, NearestAttributes)
        return recall_pb2.UserProfileResponse(
            model_version=model.version,
            catalog=model.catalog,
            categories=pack(nearest.categories, INDEX),
            category_similarities=pack(nearest.category_similarities, SCORE),
            brands=pack(nearest.brands, INDEX),
            brand_similarities=pack(nearest.brand_similarities, SCORE),
        )

    @grpc_method
    async def UserProfile(
        self, request: recall_pb2.UserProfileRequest, context: grpc.aio.ServicerContext
    ) -> recall_pb2.UserProfileResponse:
        return await self.user_profile(request, call_deadline(context))

    def catalog_chunks(self, known_catalog: str = "") -> list[recall_pb2.CatalogChunk]:
        """The served catalog as ordered chunks (one ``unchanged`` chunk when the caller has it);
        all chunks come from one bundle even if a swap happens meanwhile."""
        model = self.model
        engine = model.engine
        if known_catalog == model.catalog:
            return [
                recall_pb2.CatalogChunk(catalog=model.catalog, model_version=engine.version, unchanged=True)
            ]
        num_items = engine.num_items
        popular = engine.popularity.global_order
        interactions = np.minimum(engine.popularity.counts, np.iinfo(np.int32).max)
        chunks = []
        for offset in range(0, max(num_items, 1), CATALOG_CHUNK):
            end = min(num_items, offset + CATALOG_CHUNK)
            chunk = recall_pb2.CatalogChunk(
                catalog=model.catalog,
                model_version=engine.version,
                num_items=num_items,
                offset=offset,
                item_ids=engine.items.ids[offset:end],
                item_categories=pack(engine.item_category[offset:end], INDEX),
                item_brands=pack(engine.item_brand[offset:end], INDEX),
                item_bids=pack(engine.item_bid[offset:end], SCORE),
                popular_items=pack(popular[offset:end], INDEX),
                item_interactions=pack(interactions[offset:end], INDEX),
            )
            if offset == 0:
                chunk.category_names.extend(engine.category_names)
                chunk.brand_names.extend(engine.brand_names)
            chunks.append(chunk)
        return chunks

    async def GetCatalog(
        self, request: recall_pb2.CatalogRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[recall_pb2.CatalogChunk]:
        for chunk in self.catalog_chunks(request.known_catalog):
            yield chunk


def decode_history(
    history_items: bytes, history_types: bytes, num_items: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """A request's packed history: int64 catalog indices and event types (None: all VIEW);
    InvalidArgument naming ``history_items`` / ``history_types`` when malformed."""
    history = unpack_indices(history_items, "history_items", num_items)
    require(len(history) <= MAX_HISTORY, "history_items", f"at most {MAX_HISTORY} items, got {len(history)}")
    event_types = None
    if history_types:
        event_types = unpack(history_types, FLAGS, "history_types", len(history))
        require(
            int(event_types.max(initial=0)) <= EVENT_TYPE_MAX,
            "history_types",
            f"event types must be in 0..{EVENT_TYPE_MAX}",
        )
    return history.astype(np.int64), None if event_types is None else event_types.astype(np.int64)


__all__ = [
    "InvalidArgument",
    "RecallJob",
    "RecallMetrics",
    "RecallModel",
    "RecallResult",
    "RecallServicer",
    "decode_history",
    "run_recall_jobs",
]
