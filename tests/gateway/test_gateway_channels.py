"""The gateway connects its downstream channels before it reports ready, and a dead address does
not hold the start."""

from __future__ import annotations

import asyncio
import socket

import grpc

from gateway.server import connect_channels


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_a_channel_to_a_live_server_is_connected_before_any_call():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.get_state() is grpc.ChannelConnectivity.IDLE  # connects on first use
            assert await connect_channels([channel], timeout_s=30) == 1
            assert channel.get_state() is grpc.ChannelConnectivity.READY
    finally:
        await server.stop(None)


async def test_a_refused_address_returns_at_once_instead_of_waiting_out_the_timeout():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as live,
            grpc.aio.insecure_channel(f"127.0.0.1:{unused_port()}") as dead,
        ):
            async with asyncio.timeout(20):  # far below the 600 s given: it must not wait for it
                assert await connect_channels([dead, live], timeout_s=600) == 1
            assert live.get_state() is grpc.ChannelConnectivity.READY
            assert dead.get_state() is not grpc.ChannelConnectivity.READY
    finally:
        await server.stop(None)


async def test_no_channels_is_nothing_to_connect():
    assert await connect_channels([], timeout_s=1) == 0
