"""The gateway's bearer tokens and scopes, against the real server over fake downstreams: no or a
wrong token -> UNAUTHENTICATED, a token without the method's scope -> PERMISSION_DENIED, debug
needs `debug`, health and reflection stay open, refusals are counted, the gateway does not start
open by accident, and no user id reaches an INFO log."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import generate_latest

from gateway.server import GatewayServer, serve
from recsys.serving.config import ConfigError
from recsys.serving.logging import JsonFormatter
from recsys.serving.metrics import new_registry
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import TEST_TOKEN, gateway_channel, gateway_config, tokens_file
from tests.gateway.fakes import FakeRank, FakeRecall, FakeServer

SCOPED = {
    "recommend-only": ("recommend",),
    "recommend-debug": ("recommend", "debug"),
    "events-only": ("events",),
    "admin-only": ("admin",),
}


def token_of(name: str) -> str:
    return f"{name}-token"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayServer]:
    """The gateway over fake recall/rank, accepting TEST_TOKEN (every scope) and SCOPED tokens."""
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    scoped = tmp_path / "scoped"  # not where gateway_config() writes its own tokens file
    scoped.mkdir()
    tokens = tokens_file(scoped, *((name, token_of(name), scopes) for name, scopes in SCOPED.items()))
    server = await serve(
        gateway_config(tmp_path, recall.address, rank.address, auth_tokens_file=tokens), new_registry(False)
    )
    try:
        yield server
    finally:
        await server.stop(0)
        await recall.stop()
        await rank.stop()


def recommend(debug: bool = False, user: str = "u1") -> gateway_pb2.RecommendRequest:
    return gateway_pb2.RecommendRequest(user_id=user, scenario="home", num_items=3, debug=debug)


def log_events(user: str = "u1", event_id: str = "ev-1") -> gateway_pb2.LogEventsRequest:
    event = gateway_pb2.Event(
        event_id=event_id,
        user_id=user,
        item_id="i3",
        type=common_pb2.CLICK,
        timestamp_ms=int(time.time() * 1000),
    )
    return gateway_pb2.LogEventsRequest(events=[event])


CALLS = {
    "Recommend": recommend,
    "LogEvents": log_events,
    "ForgetUser": lambda: gateway_pb2.ForgetUserRequest(user_id="u1"),
}


async def call_code(stub: gateway_pb2_grpc.GatewayStub, method: str, request=None, **kwargs):
    """(code, details) of one call; OK's details are empty."""
    try:
        await getattr(stub, method)(CALLS[method]() if request is None else request, timeout=5, **kwargs)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("method", sorted(CALLS))
async def test_calls_without_a_valid_token_are_unauthenticated(gateway: GatewayServer, method: str):
    attempts = {
        "no token": (None, "missing 'authorization: Bearer <token>' metadata"),
        "unknown token": ((("authorization", "Bearer not-a-token"),), "invalid token"),
        "other scheme": ((("authorization", f"Basic {TEST_TOKEN}"),), "missing"),
        "token without scheme": ((("authorization", TEST_TOKEN),), "missing"),
    }
    async with gateway_channel(gateway.address, token=None) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for attempt, (metadata, details) in attempts.items():
            code, text = await call_code(stub, method, metadata=metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (attempt, code, text)
            assert details in text and TEST_TOKEN not in text, attempt
        # Refused before the request is parsed: bytes that are no message still get UNAUTHENTICATED.
        raw = channel.unary_unary(f"/recsys.v1.Gateway/{method}")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"\xff\xff\xff", timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("token", "allowed"),
    [
        ("recommend-only", {"Recommend"}),
        ("events-only", {"LogEvents"}),
        ("admin-only", {"ForgetUser"}),
    ],
)
async def test_each_method_needs_its_scope(gateway: GatewayServer, token: str, allowed: set[str]):
    async with gateway_channel(gateway.address, token=token_of(token)) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for method in CALLS:
            code, details = await call_code(stub, method)
            if method in allowed:
                assert code == grpc.StatusCode.OK, (method, code, details)
            else:
                assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
                assert f"{method} needs scope '" in details and f"token '{token}' lacks it" in details


async def test_debug_needs_the_debug_scope(gateway: GatewayServer):
    async with gateway_channel(gateway.address, token=token_of("recommend-only")) as channel:
        code, details = await call_code(gateway_pb2_grpc.GatewayStub(channel), "Recommend", recommend(True))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details == "this request needs scope 'debug'; token 'recommend-only' lacks it"
    async with gateway_channel(gateway.address, token=token_of("recommend-debug")) as channel:
        response = await gateway_pb2_grpc.GatewayStub(channel).Recommend(recommend(True), timeout=5)
        assert response.items and all(item.explanation for item in response.items)


async def test_health_and_reflection_stay_open(gateway: GatewayServer):
    async with gateway_channel(gateway.address, token=None) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "recsys.v1.Gateway"):
            status = (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        services = [s.name async for response in call for s in response.list_services_response.service]
        assert "recsys.v1.Gateway" in services


async def test_refusals_are_counted_in_the_grpc_metrics(gateway: GatewayServer):
    async with gateway_channel(gateway.address, token=None) as channel:
        await call_code(gateway_pb2_grpc.GatewayStub(channel), "LogEvents")
    async with gateway_channel(gateway.address, token=token_of("recommend-only")) as channel:
        await call_code(gateway_pb2_grpc.GatewayStub(channel), "LogEvents")
    for code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        series = f'grpc_server_handled_total{{grpc_code="{code}",grpc_method="LogEvents"'
        for _ in range(100):  # the server counts a call as its handler returns, which may be just
            if series in generate_latest(gateway.registry).decode():  # after the client got the answer
                break
            await asyncio.sleep(0.02)
        assert series in generate_latest(gateway.registry).decode(), code


async def test_the_gateway_does_not_start_open_by_accident(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    try:
        config = gateway_config(tmp_path, recall.address, rank.address)
        with pytest.raises(ConfigError, match="auth_tokens_file: required"):
            dataclasses.replace(config, auth_tokens_file=None)
        bad = tmp_path / "bad-tokens.yaml"
        bad.write_text("tokens: [{name: x, sha256: nothex, scopes: [recommend]}]")
        with pytest.raises(ConfigError, match=r"tokens\[0\]\.sha256"):
            dataclasses.replace(config, auth_tokens_file=bad)

        open_config = dataclasses.replace(config, auth_tokens_file=None, allow_unauthenticated=True)
        with caplog.at_level(logging.WARNING, logger="gateway.server"):
            server = await serve(open_config, new_registry(False))
        try:
            assert any("WITHOUT authentication" in record.getMessage() for record in caplog.records)
            async with gateway_channel(server.address, token=None) as channel:
                assert (await gateway_pb2_grpc.GatewayStub(channel).Recommend(recommend(), timeout=5)).items
        finally:
            await server.stop(0)
    finally:
        await recall.stop()
        await rank.stop()


async def test_no_user_id_or_payload_in_info_logs(gateway: GatewayServer, caplog: pytest.LogCaptureFixture):
    user = "user-PRIVATE-4711"
    formatter = JsonFormatter("gateway")
    with caplog.at_level(logging.INFO):
        async with gateway_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            await stub.Recommend(recommend(user=user), timeout=5)
            await stub.Recommend(recommend(debug=True, user=user), timeout=5)
            await stub.LogEvents(log_events(user=user, event_id=f"{user}-ev"), timeout=5)
            await call_code(stub, "Recommend", recommend(user=f"{user} with a space"))
            await call_code(stub, "LogEvents", log_events(user=f"{user}\n"))
            await call_code(stub, "ForgetUser", gateway_pb2.ForgetUserRequest(user_id=user))
        async with gateway_channel(gateway.address, token=token_of("events-only")) as channel:
            await call_code(gateway_pb2_grpc.GatewayStub(channel), "Recommend", recommend(user=user))
    info = [record for record in caplog.records if record.levelno >= logging.INFO]
    for record in info:
        assert "PRIVATE-4711" not in formatter.format(record), formatter.format(record)
