"""Graceful shutdown in a real process: SIGTERM -> NOT_SERVING -> in-flight calls finish -> exit 0;
a second signal cancels what is still running. The server is tests/serving/sigterm_server.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.serving.bootstrap import RunningServer, open_channel, run_until_signal
from recsys.v1 import recall_pb2, recall_pb2_grpc

pytestmark = pytest.mark.integration

SERVER_SCRIPT = Path(__file__).with_name("sigterm_server.py")
REPO_ROOT = Path(__file__).resolve().parents[2]


@asynccontextmanager
async def server_process(grace_seconds: float) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """The server subprocess and its gRPC port; killed on exit if it is still running."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SERVER_SCRIPT),
        str(grace_seconds),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        first_line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not first_line:
            raise AssertionError(f"server exited early: {(await process.stderr.read()).decode()}")
        yield process, json.loads(first_line)["port"]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def next_stdout_line(process: asyncio.subprocess.Process) -> str:
    return (await asyncio.wait_for(process.stdout.readline(), 10)).decode().strip()


async def test_sigterm_goes_not_serving_drains_in_flight_calls_and_exits_zero() -> None:
    async with (
        server_process(grace_seconds=20) as (process, port),
        open_channel(f"127.0.0.1:{port}") as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await asyncio.wait_for(watch.read(), 10)).status == health_pb2.HealthCheckResponse.SERVING
        in_flight = asyncio.ensure_future(
            recall_pb2_grpc.RecallServiceStub(channel).Recall(recall_pb2.RecallRequest(k=1), timeout=15)
        )
        assert await next_stdout_line(process) == "in-flight"

        process.send_signal(signal.SIGTERM)
        update = await asyncio.wait_for(watch.read(), 10)
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        assert (await in_flight).model_version == "drained"
        assert await asyncio.wait_for(process.wait(), 15) == 0

        log_lines = (await process.stderr.read()).decode().splitlines()
    entries = [json.loads(line) for line in log_lines]  # every line is one JSON object
    messages = [entry["message"] for entry in entries]
    assert "signal received; shutting down" in messages
    assert messages[-1] == "stopped"
    assert all(entry["service"] == "recall" for entry in entries)


async def test_second_signal_cancels_in_flight_calls() -> None:
    async with (
        server_process(grace_seconds=60) as (process, port),
        open_channel(f"127.0.0.1:{port}") as channel,
    ):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await asyncio.wait_for(watch.read(), 10)).status == health_pb2.HealthCheckResponse.SERVING
        hanging = asyncio.ensure_future(
            recall_pb2_grpc.RecallServiceStub(channel).Recall(
                recall_pb2.RecallRequest(k=1, scenario="hang"), timeout=30
            )
        )
        assert await next_stdout_line(process) == "in-flight"

        process.send_signal(signal.SIGTERM)
        update = await asyncio.wait_for(watch.read(), 10)
        assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
        process.send_signal(signal.SIGINT)
        # well inside the 60 s grace the first signal granted: the second one cut it short
        assert await asyncio.wait_for(process.wait(), 15) == 0
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hanging
    assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)


async def test_run_until_signal_in_process_stops_and_restores_signal_handlers(
    serve: Callable[..., Awaitable[RunningServer]],
) -> None:
    running = await serve()
    handler_before = signal.getsignal(signal.SIGTERM)
    serving = asyncio.ensure_future(run_until_signal(running))
    for _ in range(500):  # until run_until_signal has installed its handler
        if signal.getsignal(signal.SIGTERM) is not handler_before:
            break
        await asyncio.sleep(0.01)
    else:
        serving.cancel()
        raise AssertionError("run_until_signal installed no SIGTERM handler")

    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, 10)
    assert running.stopping
    assert signal.getsignal(signal.SIGTERM) is handler_before
    async with open_channel(running.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
