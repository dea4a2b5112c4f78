"""Overload by large messages against a real gateway process (`python -m gateway`): 40 concurrent
~15 MiB LogEvents calls (a valid event padded with an unknown field, so each one parses). With the
gateway's default 4 MiB limit every one is refused unread; with 16 MiB messages but a small cap on
concurrent RPCs the excess is refused before it is read. Either way the process survives, stays
SERVING and answers the next normal call and one just under the default limit; its peak memory
(from /proc) grows by at most a bound over what it held when it started serving. The gateway turns
off gRPC's flow-control window growth (bandwidth-delay probing): with it, the refused calls' bytes
already in flight were buffered, 10-165 MiB of growth from run to run."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.serving.auth import SCOPES, bearer_metadata, write_tokens_file
from recsys.v1 import common_pb2, gateway_pb2, rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import free_port
from tests.gateway.fakes import FakeRank, FakeRecall, FakeServer

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak memory from /proc"),
]

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "limits-test-token"
CALLS = 40
PADDING = 15 * 1024 * 1024


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def padded_log_events(event_id: str, padding: int) -> bytes:
    """A LogEventsRequest with one valid event plus ``padding`` bytes in unknown field 1000."""
    event = gateway_pb2.Event(
        event_id=event_id,
        user_id="u1",
        item_id="i1",
        type=common_pb2.VIEW,
        timestamp_ms=int(time.time() * 1000),
    )
    data = gateway_pb2.LogEventsRequest(events=[event]).SerializeToString()
    return data + _varint(1000 << 3 | 2) + _varint(padding) + b"p" * padding


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


async def wait_serving(channel: grpc.aio.Channel, process: subprocess.Popen, timeout_s: float = 60) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the gateway exited"
        try:
            response = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not reach SERVING")


@pytest.mark.parametrize(
    ("flags", "some_read", "growth_limit_mib"),
    [
        # the defaults: 4 MiB messages, every 15 MiB call refused from its length (measured ~1 MiB)
        ([], False, 8),
        # 4 read at once, 15 MiB each, ~3 copies while parsed (measured 210-215 MiB)
        (["--max-message-bytes", str(16 * 1024 * 1024), "--max-concurrent-rpcs", "4"], True, 320),
    ],
    ids=["default-4MiB-limit", "16MiB-messages-4-concurrent"],
)
async def test_concurrent_15mib_requests_are_refused_and_the_gateway_survives(
    tmp_path: Path, flags: list[str], some_read: bool, growth_limit_mib: float
):
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("limits", TOKEN, SCOPES)])
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    port = free_port()
    command = [
        sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        "--auth-tokens-file", str(tokens), "--sqlite-path", str(tmp_path / "history.sqlite3"),
        "--recall-address", recall.address, "--rank-address", rank.address, "--http-port", "0", *flags,
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            await wait_serving(channel, process)
            start_peak = peak_rss_mib(process.pid)
            log_events = channel.unary_unary("/recsys.v1.Gateway/LogEvents")
            metadata = bearer_metadata(TOKEN)
            payload = padded_log_events("big", PADDING)
            results = await asyncio.gather(
                *(log_events(payload, timeout=60, metadata=metadata) for _ in range(CALLS)),
                return_exceptions=True,
            )
            codes = Counter(
                r.code() if isinstance(r, grpc.aio.AioRpcError) else grpc.StatusCode.OK for r in results
            )
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > 0, codes  # the excess is refused
            assert (codes[grpc.StatusCode.OK] > 0) == some_read, codes

            assert process.poll() is None, "the gateway died"
            growth = peak_rss_mib(process.pid) - start_peak
            assert growth < growth_limit_mib, f"peak RSS grew {growth:.0f} MiB"
            await wait_serving(channel, process, timeout_s=5)
            normal = await log_events(padded_log_events("small", 0), timeout=5, metadata=metadata)
            assert gateway_pb2.LogEventsResponse.FromString(normal).accepted == 1
            just_under_limit = padded_log_events("large", 4 * 1024 * 1024 - 1024)
            large = await log_events(just_under_limit, timeout=10, metadata=metadata)
            assert gateway_pb2.LogEventsResponse.FromString(large).accepted == 1
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        await recall.stop()
        await rank.stop()
