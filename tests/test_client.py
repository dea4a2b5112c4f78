"""recsys.client against a real gateway over fake recall and rank: typed results, typed errors
naming the field, retries only of transient failures, tokens, and a serving-free import."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.server import serve
from recsys.client import (
    TOKEN_ENV,
    AsyncRecsysClient,
    Event,
    HistoryEntry,
    InvalidArgumentError,
    RecsysClient,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
    retry_service_config,
)
from recsys.serving.metrics import new_registry
from recsys.v1 import gateway_pb2_grpc, rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import TEST_TOKEN, FakeStack, gateway_channel, gateway_config
from tests.gateway.fakes import FakeRank, FakeRecall, FakeServer, item_index

GATEWAY = "recsys.v1.Gateway"
CLIENT_RUNTIME = ("grpc", "typing_extensions", "google", "recsys")  # grpcio (+ its one dependency), protobuf


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[FakeStack]:
    """The real gateway (with a fresh metrics registry) in front of fake recall and rank."""
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    gateway = await serve(gateway_config(tmp_path, recall.address, rank.address), new_registry(False))
    channel = gateway_channel(gateway.address)
    try:
        yield FakeStack(gateway, recall, rank, channel, gateway_pb2_grpc.GatewayStub(channel))
    finally:
        await channel.close()
        await gateway.stop(0)
        await recall.stop()
        await rank.stop()


def attempts(stack: FakeStack, method: str) -> int:
    """How many calls of ``method`` the gateway received (each retry is one more)."""
    return calls_received(stack.gateway, method)


def calls_received(gateway, method: str) -> int:
    labels = {"grpc_type": "unary", "grpc_service": GATEWAY, "grpc_method": method}
    return int(gateway.registry.get_sample_value("grpc_server_started_total", labels) or 0)


async def test_recommend_log_events_and_forget_user_round_trip(stack: FakeStack):
    async with AsyncRecsysClient(stack.gateway.address, token=TEST_TOKEN) as client:
        event = Event(user_id="u9", item_id="i60", type="add_to_cart", scenario="cart")
        first = await client.log_events([event])
        assert (first.accepted, first.duplicates) == (1, 0)
        again = await client.log_events([event])  # the same event_id: a duplicate, not a second event
        assert (again.accepted, again.duplicates) == (0, 1)

        result = await client.recommend("u9", "cart", num_items=3, debug=True, request_id="r-1")
        assert result.request_id == "r-1" and len(result.items) == 3
        assert result.model_version == "rank=fake-rank-1,recall=fake-recall-1"
        assert not result.degraded and result.degraded_reasons == ()
        assert result.timings_ms and all(ms >= 0 for ms in result.timings_ms.values())
        first_item = result.items[0]
        assert first_item.item_id == result.item_ids[0] and first_item.source
        assert first_item.explanation and first_item.sources and first_item.attended_item_ids == ("i60",)
        seeds = np.frombuffer(stack.fake_recall.behaviour.requests[-1].seed_items, "<i4").tolist()
        assert seeds == [60]  # the stored cart event seeded the cart scenario

        stateless = await client.recommend(
            "u1", "home", num_items=5, history=["i10", HistoryEntry("i11", type="click", timestamp_ms=5)]
        )
        assert len(stateless.items) == 5
        rank_request = stack.fake_rank.behaviour.requests[-1]
        assert np.frombuffer(rank_request.history_items, "<i4").tolist() == [10, 11]

        assert await client.forget_user("u9") == 1
        assert await client.forget_user("u9") == 0


async def test_the_blocking_client_reads_the_token_from_a_file_or_the_environment(
    stack: FakeStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    token_file = tmp_path / "dev-token"
    token_file.write_text(TEST_TOKEN + "\n")

    def use_clients() -> tuple[list[str], int]:
        with RecsysClient(stack.gateway.address, token_file=token_file, timeout_s=2.0) as client:
            items = client.recommend("u1", "category", num_items=4, category="c2").item_ids
        monkeypatch.setenv(TOKEN_ENV, TEST_TOKEN)
        with RecsysClient(stack.gateway.address) as client:
            accepted = client.log_events([Event(user_id="u1", item_id=items[0], type="click")]).accepted
        return items, accepted

    items, accepted = await asyncio.to_thread(use_clients)
    assert len(items) == 4 and all(item_index(item) % 5 == 2 for item in items)  # category c2
    assert accepted == 1
    with pytest.raises(ValueError, match="token or token_file"):
        RecsysClient(stack.gateway.address, token="t", token_file=token_file)


async def test_an_invalid_argument_names_the_field_and_is_not_retried(stack: FakeStack):
    async with AsyncRecsysClient(stack.gateway.address, token=TEST_TOKEN, retries=4) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.recommend("u1", "item_detail", num_items=5)  # item_detail needs a context item
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.field == "context.item_ids"
        assert caught.value.message.startswith("required by scenario 'item_detail'")
        assert attempts(stack, "Recommend") == 1

        with pytest.raises(InvalidArgumentError) as caught:
            await client.log_events([Event(user_id="u1", item_id="i1"), Event(user_id="u1", item_id="i 2")])
        assert caught.value.field == "events[1].item_id"
        assert attempts(stack, "LogEvents") == 1
    with pytest.raises(ValueError, match="unknown event type 'like'"):
        Event(user_id="u1", item_id="i1", type="like").to_proto()


async def test_without_a_token_the_call_is_unauthenticated_and_not_retried(
    stack: FakeStack, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    async with AsyncRecsysClient(stack.gateway.address, retries=4) as client:
        with pytest.raises(UnauthenticatedError) as caught:
            await client.recommend("u1", "home", num_items=5)
    assert "missing 'authorization: Bearer <token>'" in caught.value.details
    assert attempts(stack, "Recommend") == 1
    async with AsyncRecsysClient(stack.gateway.address, token="not-a-known-token") as client:
        with pytest.raises(UnauthenticatedError, match="invalid token"):
            await client.log_events([Event(user_id="u1", item_id="i1")])


async def test_a_transient_unavailable_is_retried_until_it_succeeds_or_retries_run_out(stack: FakeStack):
    store = stack.gateway.servicer.history_store
    append = store.append
    failures = {"left": 2}

    async def failing_twice(events):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("injected: history store down")
        return await append(events)

    store.append = failing_twice  # the gateway answers UNAVAILABLE ("history store unavailable; retry")
    async with AsyncRecsysClient(
        stack.gateway.address, token=TEST_TOKEN, retries=3, initial_backoff_s=0.05
    ) as client:
        result = await client.log_events([Event(user_id="u1", item_id="i1")])
        assert (result.accepted, result.duplicates) == (1, 0)
        assert attempts(stack, "LogEvents") == 3  # two UNAVAILABLE answers, then stored once

        failures["left"] = 100
        with pytest.raises(UnavailableError, match="history store unavailable"):
            await client.log_events([Event(user_id="u1", item_id="i2")])
        assert attempts(stack, "LogEvents") == 3 + 4  # the first attempt and 3 retries
    async with AsyncRecsysClient(stack.gateway.address, token=TEST_TOKEN, retries=0) as client:
        with pytest.raises(UnavailableError):
            await client.log_events([Event(user_id="u1", item_id="i3")])
    assert attempts(stack, "LogEvents") == 3 + 4 + 1


def test_the_retry_policy_covers_only_transient_codes():
    config = json.loads(retry_service_config(2, initial_backoff_s=0.2, max_backoff_s=1.0))
    policies = {
        name["method"]: entry["retryPolicy"] for entry in config["methodConfig"] for name in entry["name"]
    }
    assert set(policies) == {"Recommend", "LogEvents", "ForgetUser", "GetUserProfile"}
    assert {policy["maxAttempts"] for policy in policies.values()} == {3}
    for method in ("Recommend", "LogEvents", "GetUserProfile"):  # read-only / idempotent by event_id
        assert set(policies[method]["retryableStatusCodes"]) == {
            "UNAVAILABLE",
            "RESOURCE_EXHAUSTED",
            "DEADLINE_EXCEEDED",
        }
    assert set(policies["ForgetUser"]["retryableStatusCodes"]) == {"UNAVAILABLE", "RESOURCE_EXHAUSTED"}
    recommend = policies["Recommend"]
    assert (recommend["initialBackoff"], recommend["maxBackoff"]) == ("0.200s", "1.000s")
    assert json.loads(retry_service_config(0))["methodConfig"] == []
    for retries in (0, 2):  # every address the target resolves to, not the first one only
        assert json.loads(retry_service_config(retries))["loadBalancingConfig"] == [{"round_robin": {}}]
    with pytest.raises(ValueError, match="retries"):
        retry_service_config(5)  # gRPC caps a call at 5 attempts


class _Failed(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_errors_carry_the_code_and_the_field():
    error = error_from_rpc(_Failed(grpc.StatusCode.INVALID_ARGUMENT, "history[3].type: unknown event type 9"))
    assert isinstance(error, InvalidArgumentError)
    assert (error.field, error.message) == ("history[3].type", "unknown event type 9")
    assert str(error) == "INVALID_ARGUMENT: history[3].type: unknown event type 9"
    unnamed = error_from_rpc(_Failed(grpc.StatusCode.INVALID_ARGUMENT, "request could not be parsed"))
    assert isinstance(unnamed, InvalidArgumentError) and unnamed.field is None
    other = error_from_rpc(_Failed(grpc.StatusCode.FAILED_PRECONDITION, "catalog: another catalog"))
    assert type(other).__name__ == "RecsysError" and other.code == grpc.StatusCode.FAILED_PRECONDITION


def test_the_client_needs_no_serving_dependencies():
    """In a fresh interpreter where the serving stack cannot be imported, the client imports and
    builds both clients; only grpc, protobuf and the stubs are loaded."""
    code = (
        "import importlib.abc, sys\n"
        "BLOCKED = {'numpy', 'faiss', 'onnxruntime', 'torch', 'yaml', 'prometheus_client', 'redis',\n"
        "           'starlette', 'uvicorn'}\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError(f'{name} is not installed here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import asyncio\n"
        "from recsys.client import AsyncRecsysClient, RecsysClient\n"
        "RecsysClient('127.0.0.1:1', token='t').close()\n"
        "async def main():\n"
        "    await AsyncRecsysClient('127.0.0.1:1', token='t').close()\n"
        "asyncio.run(main())\n"
        "third_party = {m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names)\n"
        "print(' '.join(sorted(m for m in third_party if not m.startswith(('_', 'cython')))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    # grpcio needs typing_extensions; it aliases grpc_tools/_health/_reflection when they are installed
    allowed = {*CLIENT_RUNTIME, "grpc_tools", "grpc_health", "grpc_reflection"}
    assert loaded <= allowed, loaded - allowed


async def test_a_target_of_several_gateways_is_called_round_robin(stack: FakeStack, tmp_path: Path):
    replica = await serve(
        gateway_config(tmp_path, stack.recall.address, stack.rank.address), new_registry(False)
    )
    try:
        target = f"ipv4:{stack.gateway.address},{replica.address}"
        gateways = (stack.gateway, replica)

        def served() -> list[int]:
            return [calls_received(gateway, "Recommend") for gateway in gateways]

        async with AsyncRecsysClient(target, token=TEST_TOKEN) as client:
            # round_robin uses a replica once its connection is up: call until both have answered
            for _ in range(50):
                await client.recommend("u1", "home", num_items=3)
                if min(served()) > 0:
                    break
            assert min(served()) > 0, f"one replica never got a call: {served()}"  # pick_first: [50, 0]
            before = served()
            for _ in range(10):
                await client.recommend("u1", "home", num_items=3)
        assert [after - earlier for after, earlier in zip(served(), before, strict=True)] == [5, 5]
    finally:
        await replica.stop(0)
