"""Fuzzing the real recall and rank servers (tiny bundles) with packed requests: random field
values and byte arrays of any length, indices in and out of the catalog, NaN and infinite scores,
then the serialized bytes mutated, cut short or replaced by noise. The answer is never UNKNOWN or
INTERNAL, errors are short, and both servers are healthy and correct afterwards.

Both servers run on one event loop in a background thread; hypothesis drives them with blocking
calls (200 examples per test, no deadline)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rank_service.config import RankConfig
from rank_service.server import serve as serve_rank
from recall_service.config import RecallConfig
from recall_service.server import serve as serve_recall
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry
from recsys.serving.wire import FLAGS, INDEX, SCORE, catalog_fingerprint, pack
from recsys.sources import RECALL_SOURCES
from recsys.v1 import rank_pb2, rank_pb2_grpc, recall_pb2, recall_pb2_grpc

pytestmark = pytest.mark.integration

NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
MAX_DETAILS = 400
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def servers(recall_bundle: Path, rank_bundle: Path) -> Iterator[dict]:
    """Addresses of a real recall and rank server and the catalog they share."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-servers", daemon=True)
    thread.start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=120)

    serving = ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0)
    recall = run(
        serve_recall(RecallConfig(serving=serving, bundle=recall_bundle, device="cpu"), new_registry(False))
    )
    rank = run(serve_rank(RankConfig(serving=serving, bundle=rank_bundle, device="cpu"), new_registry(False)))
    items = (recall_bundle / "items.txt").read_text().splitlines()
    try:
        yield {
            "recall": recall.address,
            "rank": rank.address,
            "catalog": catalog_fingerprint(items),
            "n": len(items),
        }
    finally:
        run(recall.stop(0))
        run(rank.stop(0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def channels(servers: dict) -> Iterator[dict[str, grpc.Channel]]:
    with grpc.insecure_channel(servers["recall"]) as recall, grpc.insecure_channel(servers["rank"]) as rank:
        yield {"recall": recall, "rank": rank}


texts = st.one_of(st.text(max_size=20), st.sampled_from(["", "home", "cart", "u2i", "popular", "x" * 5000]))
indices = st.lists(st.integers(-3, 2_100), max_size=12)
floats = st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=12)


def int32_bytes(values: list[int]) -> bytes:
    return pack(np.clip(values, -(2**31), 2**31 - 1), INDEX)


arrays = st.one_of(indices.map(int32_bytes), st.binary(max_size=40))
score_arrays = st.one_of(floats.map(lambda v: pack(v, SCORE)), st.binary(max_size=40))
flag_arrays = st.one_of(
    st.lists(st.integers(0, 255), max_size=12).map(lambda v: pack(v, FLAGS)), st.binary(max_size=12)
)


@st.composite
def recall_requests(draw: st.DrawFn, catalog: str) -> recall_pb2.RecallRequest:
    return recall_pb2.RecallRequest(
        request_id=draw(texts),
        user_id=draw(texts),
        scenario=draw(st.one_of(texts, st.just("home"))),
        catalog=draw(st.sampled_from([catalog, "", "f" * 64])),
        sources=draw(
            st.lists(
                st.builds(
                    recall_pb2.SourceQuota,
                    source=st.one_of(texts, st.sampled_from(RECALL_SOURCES)),
                    k=st.integers(-5, 20_000),
                ),
                max_size=5,
            )
        ),
        k=draw(st.integers(-5, 20_000)),
        history_items=draw(arrays),
        history_types=draw(flag_arrays),
        seed_items=draw(arrays),
        filters=recall_pb2.RecallFilters(
            exclude_history=draw(st.booleans()),
            category=draw(texts),
            sponsored_only=draw(st.booleans()),
            exclude_items=draw(arrays),
        ),
    )


@st.composite
def rank_requests(draw: st.DrawFn, catalog: str) -> rank_pb2.RankRequest:
    return rank_pb2.RankRequest(
        request_id=draw(texts),
        user_id=draw(texts),
        scenario=draw(st.one_of(texts, st.just("home"))),
        debug=draw(st.booleans()),
        catalog=draw(st.sampled_from([catalog, "", "f" * 64])),
        history_items=draw(arrays),
        history_types=draw(flag_arrays),
        candidate_items=draw(arrays),
        recall_scores=draw(score_arrays),
        source_names=draw(st.lists(st.one_of(texts, st.sampled_from(RECALL_SOURCES)), max_size=5)),
        source_scores=draw(score_arrays),
        source_flags=draw(flag_arrays),
    )


@st.composite
def payloads(draw: st.DrawFn, messages: st.SearchStrategy) -> bytes:
    """A message's bytes: as is, with one byte replaced, cut short, or noise."""
    data = draw(messages).SerializeToString()
    how = draw(st.sampled_from(["as is", "as is", "byte replaced", "cut short", "noise"]))
    if how == "byte replaced" and data:
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + bytes([draw(st.integers(0, 255))]) + data[position + 1 :]
    elif how == "cut short" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "noise":
        data = draw(st.binary(max_size=256))
    return data


def check(channel: grpc.Channel, method: str, payload: bytes) -> None:
    try:
        channel.unary_unary(method)(payload, timeout=10)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        assert code not in NEVER, (code, details)
        assert len(details) < MAX_DETAILS, (code, details[:200])


@FUZZ
@given(data=st.data())
def test_recall_fuzz(servers: dict, channels: dict, data: st.DataObject):
    payload = data.draw(payloads(recall_requests(servers["catalog"])))
    check(channels["recall"], "/recsys.v1.RecallService/Recall", payload)


@FUZZ
@given(data=st.data())
def test_rank_fuzz(servers: dict, channels: dict, data: st.DataObject):
    payload = data.draw(payloads(rank_requests(servers["catalog"])))
    check(channels["rank"], "/recsys.v1.RankService/Rank", payload)


def test_both_servers_are_healthy_and_correct_after_the_fuzzing(servers: dict, channels: dict):
    for name, channel in channels.items():
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING, name
    recall = recall_pb2_grpc.RecallServiceStub(channels["recall"]).Recall(
        recall_pb2.RecallRequest(
            scenario="home", k=5, catalog=servers["catalog"], history_items=pack([1, 2], INDEX)
        ),
        timeout=5,
    )
    assert len(recall.items) == 5 * INDEX.itemsize
    count = len(recall.items) // INDEX.itemsize
    rank = rank_pb2_grpc.RankServiceStub(channels["rank"]).Rank(
        rank_pb2.RankRequest(
            scenario="home",
            catalog=servers["catalog"],
            candidate_items=recall.items,
            recall_scores=recall.scores,
            source_names=recall.source_names,
            source_scores=recall.source_scores,
            source_flags=recall.source_flags,
        ),
        timeout=5,
    )
    assert np.isfinite(np.frombuffer(rank.scores, "<f4")).all() and len(rank.scores) == count * SCORE.itemsize
