"""Fake recall and rank services (real gRPC servers on port 0) whose behaviour tests control:
a known catalog, deterministic scores, injected delays and failures."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc
import numpy as np

from recsys.serving.wire import FLAGS, INDEX, SCORE, catalog_fingerprint, pack
from recsys.sources import RECALL_SOURCES
from recsys.v1 import rank_pb2, rank_pb2_grpc, recall_pb2, recall_pb2_grpc

CATALOG_SIZE = 200


def category_of(index: int) -> str:
    return f"c{index % 5}"


def brand_of(index: int) -> str:
    return f"b{index % 7}"


def bid_of(index: int) -> float:
    return 0.5 + index / 100 if index % 3 == 0 else 0.0


def item_index(item_id: str) -> int:
    return int(item_id[1:])


@dataclass
class Behaviour:
    """What a fake does on its next calls."""

    delay_s: float = 0.0
    fail_with: grpc.StatusCode | None = None
    calls: int = 0
    requests: list = field(default_factory=list)
    time_remaining: list = field(default_factory=list)  # the deadline each call carried, seconds
    blocked: asyncio.Event | None = None  # when set to an Event: every call waits for it


CATEGORIES = [f"c{c}" for c in range(5)]
BRANDS = [f"b{b}" for b in range(7)]
ITEM_IDS = [f"i{index}" for index in range(CATALOG_SIZE)]
CATALOG = catalog_fingerprint(ITEM_IDS)


class FakeRecall(recall_pb2_grpc.RecallServiceServicer):
    """Items ``i0..i199``, popularity = index order. u2i ranks items after the user's last item
    (so history changes the answer), i2i the items after each seed, popular the head.
    Speaks the packed wire; ``catalog`` can be changed to simulate another bundle."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.catalog = CATALOG
        self.catalog_calls = 0
        self.profile_behaviour = Behaviour()  # UserProfile's own (Recall keeps working)

    async def GetCatalog(self, request: recall_pb2.CatalogRequest, context: grpc.aio.ServicerContext):
        self.catalog_calls += 1
        if self.behaviour.fail_with is not None:
            await context.abort(self.behaviour.fail_with, "injected failure")
        if request.known_catalog == self.catalog:
            yield recall_pb2.CatalogChunk(catalog=self.catalog, unchanged=True)
            return
        indices = np.arange(CATALOG_SIZE)
        yield recall_pb2.CatalogChunk(
            catalog=CATALOG,
            model_version="fake-recall-1",
            num_items=CATALOG_SIZE,
            offset=0,
            item_ids=ITEM_IDS,
            item_categories=pack(indices % len(CATEGORIES), INDEX),
            item_brands=pack(indices % len(BRANDS), INDEX),
            item_bids=pack([bid_of(i) for i in range(CATALOG_SIZE)], SCORE),
            category_names=CATEGORIES,
            brand_names=BRANDS,
            popular_items=pack(indices, INDEX),
        )

    async def Recall(self, request: recall_pb2.RecallRequest, context: grpc.aio.ServicerContext):
        behaviour = self.behaviour
        behaviour.calls += 1
        behaviour.requests.append(request)
        behaviour.time_remaining.append(context.time_remaining())
        if behaviour.blocked is not None:
            await behaviour.blocked.wait()
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        if behaviour.fail_with is not None:
            await context.abort(behaviour.fail_with, "injected failure")
        if request.catalog != self.catalog:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "catalog: another catalog")
        history = history_of(request)
        excluded = set(np.frombuffer(request.filters.exclude_items, "<i4").tolist())
        if request.filters.exclude_history:
            excluded |= set(history)
        merged: dict[int, dict[str, float]] = {}
        primary: dict[int, str] = {}
        for quota in request.sources:
            taken = 0
            for rank, index in enumerate(self._source(quota.source, request, history)):
                if index in excluded:
                    continue
                if request.filters.category and category_of(index) != request.filters.category:
                    continue
                if request.filters.sponsored_only and bid_of(index) <= 0:
                    continue
                score = 1.0 - rank / 1000
                if index not in merged:
                    merged[index] = {}
                    primary[index] = quota.source
                    taken += 1
                merged[index][quota.source] = score
                if taken >= quota.k:
                    break
        items = list(merged)[: request.k]
        names = list(RECALL_SOURCES)
        scores = np.zeros((len(items), len(names)), np.float32)
        flags = np.zeros(len(items), np.uint8)
        for row, index in enumerate(items):
            for source, score in merged[index].items():
                scores[row, names.index(source)] = score
                flags[row] |= 1 << names.index(source)
        return recall_pb2.RecallResponse(
            model_version="fake-recall-1",
            catalog=self.catalog,
            items=pack(items, INDEX),
            scores=pack([merged[i][primary[i]] for i in items], SCORE),
            sources=pack([names.index(primary[i]) for i in items], FLAGS),
            source_names=names,
            source_scores=scores.tobytes(),
            source_flags=flags.tobytes(),
        )

    async def UserProfile(self, request: recall_pb2.UserProfileRequest, context: grpc.aio.ServicerContext):
        """Nearest clusters: the newest history item's category (brand) first at similarity 1.0,
        then the others in index order, each 0.1 lower (see :func:`fake_nearest`)."""
        behaviour = self.profile_behaviour
        behaviour.calls += 1
        behaviour.requests.append(request)
        behaviour.time_remaining.append(context.time_remaining())
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        if behaviour.fail_with is not None:
            await context.abort(behaviour.fail_with, "injected failure")
        if request.catalog != self.catalog:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "catalog: another catalog")
        newest = history_of(request)[-1]
        categories, category_scores = fake_nearest(newest % len(CATEGORIES), len(CATEGORIES), request.top_n)
        brands, brand_scores = fake_nearest(newest % len(BRANDS), len(BRANDS), request.top_n)
        return recall_pb2.UserProfileResponse(
            model_version="fake-recall-1",
            catalog=self.catalog,
            categories=pack(categories, INDEX),
            category_similarities=pack(category_scores, SCORE),
            brands=pack(brands, INDEX),
            brand_similarities=pack(brand_scores, SCORE),
        )

    @staticmethod
    def _source(source: str, request: recall_pb2.RecallRequest, history: list[int]) -> list[int]:
        if source == "popular":
            return list(range(CATALOG_SIZE))
        if source == "u2i":
            start = history[-1] + 1 if history else 100
            return [(start + offset) % CATALOG_SIZE for offset in range(CATALOG_SIZE)]
        anchors = np.frombuffer(request.seed_items, "<i4").tolist()
        if source == "covisit" and not anchors:
            anchors = history[-3:]
        return [(anchor + offset) % CATALOG_SIZE for offset in range(1, 40) for anchor in anchors]


def fake_nearest(first: int, count: int, top_n: int) -> tuple[list[int], list[float]]:
    """FakeRecall.UserProfile's order of ``count`` attribute values: ``first``, then the others in
    index order; similarities 1.0, 0.9, 0.8, ..."""
    order = [first, *(value for value in range(count) if value != first)][:top_n]
    return order, [1.0 - 0.1 * rank for rank in range(len(order))]


def history_of(request) -> list[int]:
    """The catalog indices of a recall or rank request's history, oldest first."""
    return np.frombuffer(request.history_items, "<i4").tolist()


def candidates_of(request: rank_pb2.RankRequest) -> list[int]:
    return np.frombuffer(request.candidate_items, "<i4").tolist()


class FakeRank(rank_pb2_grpc.RankServiceServicer):
    """Score = the candidate's index (higher id = better), so rank reverses an ascending recall."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.catalog = CATALOG

    async def Rank(self, request: rank_pb2.RankRequest, context: grpc.aio.ServicerContext):
        behaviour = self.behaviour
        behaviour.calls += 1
        behaviour.requests.append(request)
        behaviour.time_remaining.append(context.time_remaining())
        if behaviour.blocked is not None:
            await behaviour.blocked.wait()
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        if behaviour.fail_with is not None:
            await context.abort(behaviour.fail_with, "injected failure")
        if request.catalog != self.catalog:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "catalog: another catalog")
        candidates = candidates_of(request)
        response = rank_pb2.RankResponse(
            model_version="fake-rank-1", catalog=self.catalog, scores=pack(candidates, SCORE)
        )
        if request.debug:
            newest = len(history_of(request)) - 1  # every candidate attended to the newest item
            response.attended = pack([[newest, -1, -1]] * len(candidates), INDEX)
        return response


class FakeServer:
    """One fake servicer on a real aio server bound to 127.0.0.1:0."""

    def __init__(self, servicer, add_to_server) -> None:
        self.servicer = servicer
        self._add = add_to_server
        self.server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = grpc.aio.server()
        self._add(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)
            self.server = None
