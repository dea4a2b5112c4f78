"""Fuzzing the real gateway (over fake recall/rank): random RecommendRequest, LogEventsRequest and
ForgetUserRequest field values, then their bytes mutated, cut short or replaced by noise, sent as
raw bytes through a generic call, with and without a token. The answer is never UNKNOWN or
INTERNAL, an INVALID_ARGUMENT is short, and the server is healthy afterwards.

The gateway runs on an event loop in a thread of its own, so hypothesis drives it with blocking
calls; examples are bounded (200 per test) and have no deadline."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server import serve
from recsys.serving.auth import bearer_metadata
from recsys.serving.metrics import new_registry
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import TEST_TOKEN, gateway_config
from tests.gateway.fakes import FakeRank, FakeRecall, FakeServer

pytestmark = pytest.mark.integration

NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
MAX_DETAILS = 400
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def gateway_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a real gateway over fake downstreams, served from a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-gateway", daemon=True)
    thread.start()

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    async def start():
        recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
        rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
        await recall.start()
        await rank.start()
        folder = Path(tmp_path_factory.mktemp("fuzz"))
        gateway = await serve(gateway_config(folder, recall.address, rank.address), new_registry(False))
        return recall, rank, gateway

    recall, rank, gateway = run(start())
    try:
        yield gateway.address
    finally:
        run(gateway.stop(0))
        run(recall.stop())
        run(rank.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def channel(gateway_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway_address) as opened:
        yield opened


texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", "home", "cart", "item_detail", "category", "i1", "u1", "a b", "\x00", "é" * 300]),
    st.just("x" * 20_000),
)
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
history_items = st.builds(common_pb2.HistoryItem, item_id=texts, type=int32, timestamp_ms=int64)
recommend_requests = st.builds(
    gateway_pb2.RecommendRequest,
    request_id=texts,
    user_id=texts,
    scenario=texts,
    num_items=st.one_of(st.integers(-2, 600), int32),
    context=st.builds(gateway_pb2.RecommendContext, item_ids=st.lists(texts, max_size=4), category=texts),
    debug=st.booleans(),
    history=st.lists(history_items, max_size=4),
)
events = st.builds(
    gateway_pb2.Event,
    event_id=texts,
    user_id=texts,
    item_id=texts,
    type=int32,
    timestamp_ms=st.one_of(st.integers(-5, 2**41), int64),
    scenario=texts,
)
log_events_requests = st.builds(gateway_pb2.LogEventsRequest, events=st.lists(events, max_size=3))
forget_user_requests = st.builds(gateway_pb2.ForgetUserRequest, user_id=texts)


@st.composite
def payloads(draw: st.DrawFn, messages: st.SearchStrategy) -> bytes:
    """A message's bytes: as is, with one byte replaced, cut short, with noise appended, or noise."""
    data = draw(messages).SerializeToString()
    how = draw(st.sampled_from(["as is", "byte replaced", "cut short", "noise appended", "noise"]))
    if how == "byte replaced" and data:
        position = draw(st.integers(0, len(data) - 1))
        data = data[:position] + bytes([draw(st.integers(0, 255))]) + data[position + 1 :]
    elif how == "cut short" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "noise appended":
        data += draw(st.binary(min_size=1, max_size=64))
    elif how == "noise":
        data = draw(st.binary(max_size=256))
    return data


def check(channel: grpc.Channel, method: str, payload: bytes, authenticated: bool) -> None:
    call = channel.unary_unary(f"/recsys.v1.Gateway/{method}")
    metadata = bearer_metadata(TEST_TOKEN) if authenticated else None
    try:
        call(payload, timeout=10, metadata=metadata)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        assert code not in NEVER, (code, details)
        assert len(details) < MAX_DETAILS, (code, details[:200])
        if not authenticated:
            assert code == grpc.StatusCode.UNAUTHENTICATED, (code, details)


def assert_healthy(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    stub = gateway_pb2_grpc.GatewayStub(channel)
    request = gateway_pb2.RecommendRequest(user_id="u1", scenario="home", num_items=3)
    assert stub.Recommend(request, timeout=5, metadata=bearer_metadata(TEST_TOKEN)).items


@FUZZ
@given(payload=payloads(recommend_requests), authenticated=st.booleans())
def test_recommend_fuzz(channel: grpc.Channel, payload: bytes, authenticated: bool):
    check(channel, "Recommend", payload, authenticated)


@FUZZ
@given(payload=payloads(log_events_requests), authenticated=st.booleans())
def test_log_events_fuzz(channel: grpc.Channel, payload: bytes, authenticated: bool):
    check(channel, "LogEvents", payload, authenticated)


@FUZZ
@given(payload=payloads(forget_user_requests))
def test_forget_user_fuzz(channel: grpc.Channel, payload: bytes):
    check(channel, "ForgetUser", payload, authenticated=True)


def test_the_gateway_is_healthy_after_the_fuzzing(channel: grpc.Channel):
    assert_healthy(channel)
