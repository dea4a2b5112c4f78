"""Fixtures for gateway tests: fake downstreams, a gateway in front of them, a real redis-server."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import DEFAULT_SCENARIOS, GatewayConfig
from gateway.server import GatewayServer, serve
from recsys.serving.auth import SCOPES, BearerTokenInterceptor, write_tokens_file
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry
from recsys.v1 import gateway_pb2_grpc, rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.fakes import FakeRank, FakeRecall, FakeServer

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
TEST_TOKEN = "test-token-with-every-scope"  # in the tokens file gateway_config() writes


def tokens_file(folder: Path, *tokens: tuple[str, str, tuple[str, ...]]) -> Path:
    """A tokens file in ``folder`` accepting TEST_TOKEN (every scope) plus ``tokens``
    (``(name, token, scopes)``)."""
    path = folder / "auth-tokens.json"
    write_tokens_file(path, [("tests", TEST_TOKEN, SCOPES), *tokens])
    return path


def gateway_channel(address: str, token: str | None = TEST_TOKEN) -> grpc.aio.Channel:
    """A channel to the gateway whose calls carry ``token`` (none: unauthenticated)."""
    interceptors = [BearerTokenInterceptor(token)] if token is not None else None
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port for the session (skips when not installed)."""
    if not Path(REDIS_SERVER).is_file():
        pytest.skip("redis-server not installed (make system-deps installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start on port {port}")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class FakeStack:
    gateway: GatewayServer
    recall: FakeServer
    rank: FakeServer
    channel: grpc.aio.Channel
    stub: gateway_pb2_grpc.GatewayStub

    @property
    def fake_recall(self) -> FakeRecall:
        return self.recall.servicer

    @property
    def fake_rank(self) -> FakeRank:
        return self.rank.servicer


def stretch_budgets(node: Any, factor: float) -> Any:
    """A copy of a scenario document with every ``timeout_ms`` multiplied by ``factor`` (tests
    that assert behaviour must not turn a starved CI core into a degraded answer)."""
    if isinstance(node, dict):
        return {
            key: value * factor if key == "timeout_ms" else stretch_budgets(value, factor)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [stretch_budgets(value, factor) for value in node]
    return node


def gateway_config(tmp_path: Path, recall_address: str, rank_address: str, **overrides) -> GatewayConfig:
    config = GatewayConfig(
        serving=ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0.5),
        scenarios_path=DEFAULT_SCENARIOS,
        recall_address=recall_address,
        rank_address=rank_address,
        sqlite_path=tmp_path / "history.sqlite3",
        auth_tokens_file=tokens_file(tmp_path),
    )
    return replace(config, **overrides)


@pytest.fixture
def fake_stack_overrides() -> dict:
    """Config overrides every ``fake_stack`` in a module gets (redefine this fixture in the module)."""
    return {}


@pytest.fixture
async def fake_stack(
    tmp_path: Path, request: pytest.FixtureRequest, fake_stack_overrides: dict
) -> AsyncIterator[FakeStack]:
    """The real gateway in front of fake recall and rank servers; override config with
    ``@pytest.mark.parametrize("fake_stack", [{...}], indirect=True)`` or ``fake_stack_overrides``."""
    overrides = {**fake_stack_overrides, **(getattr(request, "param", {}) or {})}
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    gateway = await serve(
        gateway_config(tmp_path, recall.address, rank.address, **overrides), new_registry(False)
    )
    channel = gateway_channel(gateway.address)
    try:
        yield FakeStack(gateway, recall, rank, channel, gateway_pb2_grpc.GatewayStub(channel))
    finally:
        await channel.close()
        await gateway.stop(0)
        await recall.stop()
        await rank.stop()


async def eventually(condition, timeout_s: float = 5.0) -> None:
    """Wait until ``condition()`` holds (e.g. a metric the server records after it answered)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)
