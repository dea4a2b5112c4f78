"""The serving bootstrap on a real server bound to port 0: health transitions, reflection,
/metrics content, status codes for bad fields and unexpected errors, message size limits."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from recsys.serving.bootstrap import RunningServer, open_channel, run_until_signal
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import LATENCY_BUCKETS, bundle_info
from recsys.serving.wire import INDEX, pack
from recsys.v1 import recall_pb2, recall_pb2_grpc
from tests.serving.conftest import candidate_count

pytestmark = pytest.mark.integration

ServeFactory = Callable[..., Awaitable[RunningServer]]  # the `serve` fixture (conftest.py)
RECALL_SERVICE = "recsys.v1.RecallService"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return response.status


async def recall_error(channel: grpc.aio.Channel, request: recall_pb2.RecallRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await recall_pb2_grpc.RecallServiceStub(channel).Recall(request, timeout=5)
    return caught.value


def scrape(port: int) -> dict[str, list]:
    """/metrics parsed into {family name: samples}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


async def test_health_follows_warmup_then_stop(serve: ServeFactory) -> None:
    warmup_started, release_warmup = asyncio.Event(), asyncio.Event()

    async def warmup() -> None:
        warmup_started.set()
        await release_warmup.wait()

    running = await serve(warmup=warmup, wait_for_warmup=False)
    async with open_channel(running.address) as channel:
        await asyncio.wait_for(warmup_started.wait(), 5)
        assert await health_status(channel) == NOT_SERVING
        assert await health_status(channel, RECALL_SERVICE) == NOT_SERVING

        release_warmup.set()
        await asyncio.wait_for(running.wait_until_serving(), 5)
        assert await health_status(channel) == SERVING
        assert await health_status(channel, RECALL_SERVICE) == SERVING

        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=RECALL_SERVICE)
        )
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(running.stop(grace=5))
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        watch.cancel()
        await asyncio.wait_for(stopping, 5)
        await running.set_serving(True)  # ignored once stopping: stays NOT_SERVING
        status = await running.health.Check(health_pb2.HealthCheckRequest(service=""), context=None)
        assert status.status == NOT_SERVING
        await running.stop()  # idempotent


async def test_failed_warmup_stops_the_server_and_raises(serve: ServeFactory) -> None:
    async def warmup() -> None:
        raise RuntimeError("bundle is corrupt")

    with pytest.raises(RuntimeError, match="bundle is corrupt"):
        await serve(warmup=warmup)


async def test_run_until_signal_raises_a_background_warmup_failure(serve: ServeFactory) -> None:
    async def warmup() -> None:
        raise RuntimeError("bundle is corrupt")

    running = await serve(warmup=warmup, wait_for_warmup=False)
    with pytest.raises(RuntimeError, match="bundle is corrupt"):
        await asyncio.wait_for(run_until_signal(running), 10)
    assert running.stopping
    async with open_channel(running.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health_status(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_reflection_lists_registered_health_and_reflection_services(serve: ServeFactory) -> None:
    running = await serve()
    async with open_channel(running.address) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=RECALL_SERVICE))
        described = await call.read()
        await call.done_writing()

    assert {service.name for service in listed.list_services_response.service} == {
        RECALL_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    assert running.service_names == [RECALL_SERVICE]
    assert described.WhichOneof("message_response") == "file_descriptor_response"
    assert described.file_descriptor_response.file_descriptor_proto  # clients can decode the contract


async def test_metrics_record_codes_and_latency(serve: ServeFactory) -> None:
    running = await serve()
    bundle_info(running.registry, "recall", "recall", "2024-01-01T00-00-00")
    async with open_channel(running.address) as channel:
        stub = recall_pb2_grpc.RecallServiceStub(channel)
        response = await stub.Recall(recall_pb2.RecallRequest(k=3), timeout=5)
        assert candidate_count(response) == 3
        await recall_error(channel, recall_pb2.RecallRequest(k=0))
        await recall_error(channel, recall_pb2.RecallRequest(k=1, scenario="explode"))

    families = await asyncio.to_thread(scrape, running.metrics_port)
    recall_labels = {"grpc_type": "unary", "grpc_service": RECALL_SERVICE, "grpc_method": "Recall"}

    def value(family: str, sample_name: str, **labels: str) -> float:
        return sum(
            sample.value
            for sample in families[family]
            if sample.name == sample_name and labels.items() <= sample.labels.items()
        )

    assert value("grpc_server_started", "grpc_server_started_total", **recall_labels) == 3
    handled = {
        code: value("grpc_server_handled", "grpc_server_handled_total", **recall_labels, grpc_code=code)
        for code in ("OK", "INVALID_ARGUMENT", "INTERNAL", "UNKNOWN")
    }
    assert handled == {"OK": 1, "INVALID_ARGUMENT": 1, "INTERNAL": 1, "UNKNOWN": 0}
    buckets = [
        sample
        for sample in families["grpc_server_handling_seconds"]
        if sample.name == "grpc_server_handling_seconds_bucket"
        and recall_labels.items() <= sample.labels.items()
    ]
    assert [float(sample.labels["le"]) for sample in buckets] == [*LATENCY_BUCKETS, float("inf")]
    assert buckets[-1].value == 3
    assert value("grpc_server_handling_seconds", "grpc_server_handling_seconds_count", **recall_labels) == 3
    assert (
        value("recsys_bundle_info", "recsys_bundle_info", kind="recall", version="2024-01-01T00-00-00") == 1
    )
    assert "process_cpu_seconds" in families


async def test_bad_fields_give_invalid_argument_naming_the_field(serve: ServeFactory) -> None:
    running = await serve()
    async with open_channel(running.address) as channel:
        error = await recall_error(channel, recall_pb2.RecallRequest(k=0))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == "k: must be in 1..10000, got 0"

        sources = [recall_pb2.SourceQuota(source="u2i"), recall_pb2.SourceQuota(source="bad id")]
        error = await recall_error(channel, recall_pb2.RecallRequest(k=5, sources=sources))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details().startswith("sources[1].source: ")


async def test_unexpected_error_gives_internal_and_logs_the_traceback(
    serve: ServeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    running = await serve()
    caplog.set_level(logging.ERROR, logger="recsys.serving.validation")
    async with open_channel(running.address) as channel:
        error = await recall_error(
            channel, recall_pb2.RecallRequest(k=5, scenario="explode", request_id="r-7")
        )
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error"  # no internals leak to the client
    [record] = [record for record in caplog.records if record.name == "recsys.serving.validation"]
    assert record.exc_info is not None and "index corrupted" in str(record.exc_info[1])
    assert record.request_id == "r-7"


async def test_oversized_request_is_rejected_with_resource_exhausted(serve: ServeFactory) -> None:
    config = ServingConfig(host="127.0.0.1", max_message_bytes=1024, grace_seconds=0)
    running = await serve(config)
    async with open_channel(running.address) as channel:
        small = recall_pb2.RecallRequest(k=5, history_items=pack([1], INDEX))
        assert candidate_count(await recall_pb2_grpc.RecallServiceStub(channel).Recall(small, timeout=5)) == 5

        large = recall_pb2.RecallRequest(k=5, history_items=pack(range(300), INDEX))
        assert large.ByteSize() > 1024
        error = await recall_error(channel, large)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_unknown_method_is_unimplemented(serve: ServeFactory) -> None:
    running = await serve()
    async with open_channel(running.address) as channel:
        call = channel.unary_unary("/recsys.v1.RankService/Rank")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_taken_grpc_port_fails_loudly(serve: ServeFactory) -> None:
    running = await serve()
    clash = ServingConfig(host="127.0.0.1", port=running.port)
    with pytest.raises(OSError, match=f"cannot bind gRPC address 127.0.0.1:{running.port}"):
        await serve(clash)


async def test_a_taken_metrics_port_fails_loudly_and_releases_the_grpc_port(serve: ServeFactory) -> None:
    running = await serve()
    with socket.socket() as probe:  # a free port for the second server's gRPC side
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    clash = ServingConfig(host="127.0.0.1", port=free_port, metrics_port=running.metrics_port)
    with pytest.raises(OSError, match=f"cannot bind metrics address 127.0.0.1:{running.metrics_port}"):
        await serve(clash)
    again = await serve(ServingConfig(host="127.0.0.1", port=free_port))
    assert again.port == free_port


PINNED_SERVER = """
import asyncio, json, os, sys, threading
from recsys.serving.bootstrap import start_server
from recsys.serving.config import ServingConfig

cpu = sys.argv[1]
earlier = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
earlier.start()  # a thread that exists before the server pins the process (like a bundle's)


async def main():
    config = ServingConfig(host="127.0.0.1", metrics_port=0, cpu_affinity=cpu)
    running = await start_server(config, "recall", lambda server: [])
    later = []
    thread = threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0))))
    thread.start()
    thread.join()
    threads = [sorted(os.sched_getaffinity(int(task))) for task in os.listdir("/proc/self/task")]
    await running.stop(0)
    print(json.dumps({"threads": threads, "later": later[0]}))


asyncio.run(main())
"""


def test_cpu_affinity_pins_every_thread_of_the_server_process_and_those_started_later(tmp_path) -> None:
    """Run in its own process: pinning the test process would slow every test after it."""
    cpu = max(os.sched_getaffinity(0))
    script = tmp_path / "pinned_server.py"
    script.write_text(PINNED_SERVER)
    done = subprocess.run(
        [sys.executable, str(script), str(cpu)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(report["threads"]) >= 3  # main, the earlier thread, gRPC's and /metrics' own
    assert all(cpus == [cpu] for cpus in report["threads"]), report["threads"]
    assert report["later"] == [cpu]
    assert f"threads pinned to CPUs {cpu}" in done.stderr  # the bootstrap's log line
