"""Nothing acknowledged is lost, nothing is counted twice, a failing store answers UNAVAILABLE.

- A writer process is SIGKILLed right after the store acknowledged its events; reopened, the
  store holds every acknowledged event (SQLite with its default ``synchronous=NORMAL``; Redis
  with ``appendonly yes`` + ``appendfsync always``, the server killed too and restarted from its
  append-only file).
- Through a real gateway: retries of old, replayed and cross-user event ids are duplicates; a
  store failure is UNAVAILABLE (retryable) and the retry lands once; ForgetUser; the
  ``synchronous`` and dedupe retention settings reach the store.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from gateway.config import build_parser
from gateway.history import HistoryStore, RedisHistoryStore, SQLiteHistoryStore
from gateway.server import GatewayServer, serve
from recsys.serving.config import ConfigError
from recsys.serving.metrics import new_registry
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import REDIS_SERVER, free_port, gateway_channel, gateway_config
from tests.gateway.fakes import FakeRank, FakeRecall, FakeServer

REPO_ROOT = Path(__file__).resolve().parents[2]
WINDOW = 5  # much smaller than the events written: the stored events, not just the window, survive
ACKS_BEFORE_KILL = 40

# Appends one event per call for user "writer" and prints "acked <i>" once the call returned;
# keeps going until killed, so the kill lands while later appends are in flight.
WRITER = f"""
import asyncio, sys
from gateway.history import RedisHistoryStore, SQLiteHistoryStore, StoredEvent

async def main(backend, location):
    if backend == "sqlite":
        store = SQLiteHistoryStore(location, {WINDOW})
    else:
        store = RedisHistoryStore(location, {WINDOW}, timeout_s=5)
    i = 0
    while True:
        result = await store.append([StoredEvent(f"e{{i}}", "writer", f"item{{i}}", 1, 1000 + i)])
        assert result.accepted == 1
        print(f"acked {{i}}", flush=True)
        i += 1

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


class RedisServer:
    """A redis-server of the test's own, persistent the way the durability claim needs: the
    append-only file, fsynced before each reply (``appendfsync always``)."""

    def __init__(self, workdir: Path):
        if not Path(REDIS_SERVER).is_file():
            pytest.skip("redis-server not installed (make system-deps installs it)")
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not self._answers_ping():  # PONG only once it has loaded its append-only file
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown hook gets to flush anything."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.workdir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def acked_then_killed(backend: str, location: str) -> list[int]:
    """Run the writer, SIGKILL it on its ACKS_BEFORE_KILL-th acknowledgement; every event index
    it reported acknowledged (including any printed before the kill landed)."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, backend, location],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    try:
        assert writer.stdout is not None
        for line in writer.stdout:
            acked.append(int(line.split()[1]))
            if len(acked) == ACKS_BEFORE_KILL:
                writer.send_signal(signal.SIGKILL)
                break
        acked += [int(line.split()[1]) for line in writer.stdout]  # printed before it died
    finally:
        writer.kill()
        _, errors = writer.communicate(timeout=30)
    assert writer.returncode == -signal.SIGKILL, errors
    assert len(acked) >= ACKS_BEFORE_KILL, errors
    return acked


async def stored_indexes(store: HistoryStore) -> set[int]:
    try:
        return {int(e.event_id[1:]) for e in await store.history("writer", limit=100_000)}
    finally:
        await store.close()


async def test_sqlite_keeps_every_acknowledged_event_across_kill_9(tmp_path: Path):
    path = tmp_path / "history.sqlite3"
    acked = acked_then_killed("sqlite", str(path))
    assert set(acked) <= await stored_indexes(SQLiteHistoryStore(path, WINDOW))


async def test_redis_keeps_every_acknowledged_event_across_kill_9_of_writer_and_server(
    redis_server: RedisServer,
):
    acked = acked_then_killed("redis", redis_server.url)
    redis_server.kill()  # right after the acknowledgement: Redis too dies without a shutdown
    redis_server.start()  # reloads its append-only file
    assert set(acked) <= await stored_indexes(RedisHistoryStore(redis_server.url, WINDOW))


# -- through a real gateway ---------------------------------------------------------------------


@dataclass
class Gateway:
    server: GatewayServer
    channel: grpc.aio.Channel

    @property
    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        return gateway_pb2_grpc.GatewayStub(self.channel)

    @property
    def store(self) -> HistoryStore:
        return self.server.servicer.history_store

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop(0)


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeServer, FakeServer]]:
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    yield recall, rank
    await recall.stop()
    await rank.stop()


async def start_gateway(tmp_path: Path, fakes: tuple[FakeServer, FakeServer], **overrides) -> Gateway:
    recall, rank = fakes
    config = gateway_config(tmp_path, recall.address, rank.address, max_history_length=WINDOW, **overrides)
    server = await serve(config, new_registry(False))
    return Gateway(server, gateway_channel(server.address))


@pytest.fixture(params=["sqlite", "redis"])
async def gateway(
    request: pytest.FixtureRequest, tmp_path: Path, fakes: tuple[FakeServer, FakeServer]
) -> AsyncIterator[Gateway]:
    overrides = {}
    if request.param == "redis":
        overrides = {"history_backend": "redis", "redis_url": request.getfixturevalue("redis_url")}
    running = await start_gateway(tmp_path, fakes, **overrides)
    yield running
    await running.stop()


def event(event_id: str, user_id: str = "u1", timestamp_ms: int = 1_000) -> gateway_pb2.Event:
    return gateway_pb2.Event(
        event_id=event_id, user_id=user_id, item_id="i1", type=common_pb2.VIEW, timestamp_ms=timestamp_ms
    )


async def log(stub: gateway_pb2_grpc.GatewayStub, *events: gateway_pb2.Event) -> tuple[int, int]:
    response = await stub.LogEvents(gateway_pb2.LogEventsRequest(events=events), timeout=5)
    return response.accepted, response.duplicates


async def test_old_replayed_and_cross_user_event_ids_are_duplicates_including_on_retry(gateway: Gateway):
    run = os.urandom(4).hex()  # ids unique per run: the session's Redis is shared by the tests
    user, other_user = f"u-{run}", f"v-{run}"
    stub = gateway.stub

    window = [event(f"{run}-new{i}", user, timestamp_ms=10_000 + i) for i in range(WINDOW)]
    assert await log(stub, *window) == (WINDOW, 0)
    old = event(f"{run}-old", user, timestamp_ms=1)  # older than the user's whole window
    assert await log(stub, old) == (1, 0)
    for _ in range(2):
        assert await log(stub, old) == (0, 1)

    first = event(f"{run}-first", user, timestamp_ms=2)
    assert await log(stub, first) == (1, 0)
    newer = [event(f"{run}-newer{i}", user, timestamp_ms=20_000 + i) for i in range(250)]
    for start in range(0, len(newer), 50):
        assert await log(stub, *newer[start : start + 50]) == (50, 0)
    for _ in range(2):  # replayed after 250 newer events
        assert await log(stub, first) == (0, 1)

    cross_user = [event(f"{run}-old", other_user), event(f"{run}-first", other_user)]
    for _ in range(2):
        assert await log(stub, *cross_user) == (0, 2)
    assert await gateway.store.history(other_user) == []

    stored = [e.event_id for e in await gateway.store.history(user, limit=1000)]
    assert len(stored) == len(set(stored)) == WINDOW + 2 + 250  # every accepted event, once


async def test_a_store_failure_is_unavailable_and_the_retry_lands_once(
    tmp_path: Path, fakes: tuple[FakeServer, FakeServer], redis_server: RedisServer
):
    running = await start_gateway(tmp_path, fakes, history_backend="redis", redis_url=redis_server.url)
    try:
        stub = running.stub
        assert await log(stub, event("before")) == (1, 0)
        redis_server.kill()
        batch = [event("during-1"), event("during-2")]
        for call in (
            stub.LogEvents(gateway_pb2.LogEventsRequest(events=batch), timeout=5),
            stub.ForgetUser(gateway_pb2.ForgetUserRequest(user_id="u1"), timeout=5),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error.value.details().startswith("history store unavailable")
        redis_server.start()
        assert await log(stub, *batch) == (2, 0)  # the client's retry
        assert await log(stub, *batch) == (0, 2)  # and its retry
        assert [e.event_id for e in await running.store.history("u1")] == ["before", "during-1", "during-2"]
    finally:
        await running.stop()


async def test_a_sqlite_store_failure_is_unavailable(tmp_path: Path, fakes: tuple[FakeServer, FakeServer]):
    running = await start_gateway(tmp_path, fakes)
    try:
        store = running.store
        assert isinstance(store, SQLiteHistoryStore)
        store._connection.close()  # every later call fails inside the store
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await running.stub.LogEvents(gateway_pb2.LogEventsRequest(events=[event("e1")]), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await running.stop()


async def test_forget_user_deletes_history_and_dedupe_records(gateway: Gateway):
    run = os.urandom(4).hex()
    alice, bob = f"alice-{run}", f"bob-{run}"
    stub = gateway.stub
    await log(stub, *(event(f"{run}-a{i}", user_id=alice, timestamp_ms=i) for i in range(WINDOW + 2)))
    await log(stub, event(f"{run}-b", user_id=bob))

    response = await stub.ForgetUser(gateway_pb2.ForgetUserRequest(user_id=alice), timeout=5)
    assert response.deleted_events == WINDOW + 2
    assert await gateway.store.history(alice, limit=1000) == []
    assert alice in await gateway.store.forgotten_users()  # for the next training export
    assert len(await gateway.store.history(bob)) == 1
    assert await log(stub, event(f"{run}-a0", user_id=alice)) == (1, 0)  # dedupe record gone too
    assert (await stub.ForgetUser(gateway_pb2.ForgetUserRequest(user_id=f"nobody-{run}"))).deleted_events == 0

    for user_id, message in (("", "user_id: must not be empty"), ("a b", "user_id: must not contain")):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.ForgetUser(gateway_pb2.ForgetUserRequest(user_id=user_id), timeout=5)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details().startswith(message)


async def test_the_durability_settings_reach_the_store(
    tmp_path: Path, fakes: tuple[FakeServer, FakeServer], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("RECSYS_SQLITE_SYNCHRONOUS", "full")
    args = build_parser().parse_args(["--dedupe-retention-hours", "24"])
    assert (args.sqlite_synchronous, args.dedupe_retention_hours) == ("FULL", 24.0)
    for bad, message in (
        ({"sqlite_synchronous": "OFF"}, "sqlite_synchronous: must be one of NORMAL, FULL"),
        ({"dedupe_retention_hours": 0}, "dedupe_retention_hours: must be > 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            gateway_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2", **bad)

    running = await start_gateway(tmp_path, fakes, sqlite_synchronous="FULL", dedupe_retention_hours=24)
    try:
        store = running.store
        assert isinstance(store, SQLiteHistoryStore)
        assert store._connection.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store.retention_ms == 24 * 3600 * 1000
    finally:
        await running.stop()
