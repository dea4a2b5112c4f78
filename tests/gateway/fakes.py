"""Fake recall and rank services (real gRPC servers on port 0) whose behaviour tests control:
a known catalog, deterministic scores, injected delays and failures."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import grpc

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


class FakeRecall(recall_pb2_grpc.RecallServiceServicer):
    """Items ``i0..i199``, popularity = index order. u2i ranks items after the user's last item
    (so history changes the answer), i2i the items after each seed, popular the head."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()

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
        excluded = set(request.filters.exclude_item_ids)
        if request.filters.exclude_history:
            excluded |= {entry.item_id for entry in request.history}
        merged: dict[str, recall_pb2.Candidate] = {}
        for quota in request.sources:
            for rank, index in enumerate(self._source(quota.source, request)):
                item_id = f"i{index}"
                if item_id in excluded:
                    continue
                if request.filters.category and category_of(index) != request.filters.category:
                    continue
                if request.filters.sponsored_only and bid_of(index) <= 0:
                    continue
                score = 1.0 - rank / 1000
                if item_id not in merged:
                    merged[item_id] = recall_pb2.Candidate(
                        item_id=item_id,
                        score=score,
                        source=quota.source,
                        category=category_of(index),
                        brand=brand_of(index),
                        bid=bid_of(index),
                    )
                merged[item_id].source_scores[quota.source] = score
                if sum(1 for c in merged.values() if c.source == quota.source) >= quota.k:
                    break
        candidates = list(merged.values())[: request.k]
        return recall_pb2.RecallResponse(candidates=candidates, model_version="fake-recall-1")

    @staticmethod
    def _source(source: str, request: recall_pb2.RecallRequest) -> list[int]:
        if source == "popular":
            return list(range(CATALOG_SIZE))
        if source == "u2i":
            start = item_index(request.history[-1].item_id) + 1 if request.history else 100
            return [(start + offset) % CATALOG_SIZE for offset in range(CATALOG_SIZE)]
        anchors = [item_index(seed) for seed in request.seed_item_ids]
        if source == "covisit" and not anchors:
            anchors = [item_index(entry.item_id) for entry in request.history[-3:]]
        return [(anchor + offset) % CATALOG_SIZE for offset in range(1, 40) for anchor in anchors]


class FakeRank(rank_pb2_grpc.RankServiceServicer):
    """Score = the candidate's index (higher id = better), so rank reverses an ascending recall."""

    def __init__(self) -> None:
        self.behaviour = Behaviour()

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
        attended = [request.history[-1].item_id] if request.debug and request.history else []
        results = [
            rank_pb2.RankedCandidate(
                item_id=c.item_id, score=float(item_index(c.item_id)), attended_item_ids=attended
            )
            for c in request.candidates
        ]
        return rank_pb2.RankResponse(results=results, model_version="fake-rank-1")


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
