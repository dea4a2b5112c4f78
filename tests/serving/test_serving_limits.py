"""Server options every service gets from the bootstrap: a cap on concurrent RPCs (the excess is
refused with RESOURCE_EXHAUSTED, the server stays healthy), connections that expire so clients
re-resolve and reach new replicas, and INVALID_ARGUMENT (counted) for requests that do not parse,
even on services that are not ours (the health service)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from recsys.serving.bootstrap import connection_age_options, open_channel, start_server
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry

SLOW_SERVICE = "test.Slow"


async def _wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await asyncio.sleep(0.3)
    return request


def register_slow(server: grpc.aio.Server) -> list[str]:
    handler = grpc.unary_unary_rpc_method_handler(_wait)  # raw bytes in and out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SLOW_SERVICE, {"Wait": handler}),))
    return [SLOW_SERVICE]


def config(**overrides) -> ServingConfig:
    return ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0, **overrides)


async def health_status(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return (await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)).status


async def test_calls_beyond_max_concurrent_rpcs_are_refused_and_the_server_stays_healthy() -> None:
    running = await start_server(config(max_concurrent_rpcs=2), "test", register_slow)
    try:
        async with open_channel(running.address) as channel:
            wait = channel.unary_unary(f"/{SLOW_SERVICE}/Wait")
            results = await asyncio.gather(*(wait(b"x", timeout=5) for _ in range(8)), return_exceptions=True)
            refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert 1 <= len(results) - len(refused) <= 2
            assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert await wait(b"again", timeout=5) == b"again"
    finally:
        await running.stop(0)


def test_connection_age_options() -> None:
    assert connection_age_options(config(max_connection_age_s=0)) == []
    assert connection_age_options(config(max_connection_age_s=30, max_connection_age_grace_s=2.5)) == [
        ("grpc.max_connection_age_ms", 30000),
        ("grpc.max_connection_age_grace_ms", 2500),
    ]


async def test_connections_expire_and_the_client_reconnects() -> None:
    running = await start_server(
        config(max_connection_age_s=0.3, max_connection_age_grace_s=0.2), "test", register_slow
    )
    try:
        async with open_channel(running.address) as channel:
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            assert channel.get_state() == grpc.ChannelConnectivity.READY
            # The server's GOAWAY takes the connection away without any call failing.
            await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), timeout=5)
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop(0)


async def test_a_request_that_does_not_parse_is_invalid_argument_and_counted() -> None:
    registry = new_registry(process_metrics=False)
    running = await start_server(config(), "test", register_slow, registry=registry)
    try:
        async with open_channel(running.address) as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            good = health_pb2.HealthCheckRequest(service="abc").SerializeToString()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await check(good.replace(b"abc", b"a\xffc"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == "service: must be valid UTF-8"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await check(b"\x0a\x05ab", timeout=5)  # a string field cut short
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith("request: cannot be parsed as grpc.health.v1.")
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        text = generate_latest(registry).decode()
        assert (
            'grpc_server_handled_total{grpc_code="INVALID_ARGUMENT",grpc_method="Check",'
            'grpc_service="grpc.health.v1.Health",grpc_type="unary"} 2.0'
        ) in text
    finally:
        await running.stop(0)
