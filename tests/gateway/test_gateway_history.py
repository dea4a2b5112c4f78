"""History stores: both backends idempotent by event id across users (a dedupe record kept for the
retention, independent of the window), every accepted event stored (the window is a view),
oldest first, per user; ForgetUser's store side."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from gateway.history import (
    HistoryStore,
    RedisHistoryStore,
    SQLiteHistoryStore,
    StoredEvent,
    open_history_store,
)

WINDOW = 5


class FakeClock:
    """Milliseconds since the epoch, advanced by the test."""

    def __init__(self, now_ms: int = 1_700_000_000_000):
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def open_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path, **options) -> HistoryStore:
    if kind == "sqlite":
        return SQLiteHistoryStore(tmp_path / f"history-{uuid.uuid4().hex}.sqlite3", WINDOW, **options)
    redis_url = request.getfixturevalue("redis_url")
    return RedisHistoryStore(redis_url, WINDOW, key_prefix=f"test-{uuid.uuid4().hex}:", **options)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path):
    history_store = open_store(backend, request, tmp_path)
    yield history_store
    await history_store.close()


def event(event_id: str, item_id: str, timestamp_ms: int, user_id: str = "u1", event_type: int = 1):
    return StoredEvent(
        event_id=event_id, user_id=user_id, item_id=item_id, event_type=event_type, timestamp_ms=timestamp_ms
    )


async def test_append_is_idempotent_by_event_id_and_reports_which_were_new(store: HistoryStore):
    result = await store.append([event("e1", "a", 10), event("e2", "b", 20), event("e1", "a", 10)])
    assert result.stored == (True, True, False)
    result = await store.append([event("e2", "b", 20), event("e3", "c", 30)])
    assert (result.accepted, result.duplicates) == (1, 1)
    assert [e.item_id for e in await store.history("u1")] == ["a", "b", "c"]


async def test_history_is_ordered_by_time_capped_and_per_user(store: HistoryStore):
    await store.append([event(f"e{t}", f"item{t}", t, event_type=3) for t in (7, 3, 9, 1, 5, 8, 2)])
    await store.append([event("other", "x", 4, user_id="u2")])
    history = await store.history("u1")
    assert [e.timestamp_ms for e in history] == [3, 5, 7, 8, 9]  # the newest 5, oldest first
    assert {e.event_type for e in history} == {3}
    assert [e.item_id for e in await store.history("u1", limit=2)] == ["item8", "item9"]
    assert [e.item_id for e in await store.history("u2")] == ["x"]
    assert await store.history("nobody") == []
    await store.ping()


async def test_concurrent_appends_lose_nothing(store: HistoryStore):
    await asyncio.gather(
        *(store.append([event(f"e{i}", f"i{i}", i, user_id=f"user{i % 3}")]) for i in range(30))
    )
    for user in range(3):
        assert len(await store.history(f"user{user}")) == WINDOW
        assert len(await store.history(f"user{user}", limit=100)) == 10  # all stored


async def test_an_event_older_than_the_window_is_stored_and_its_retry_is_a_duplicate(store: HistoryStore):
    await store.append([event(f"new{t}", f"n{t}", 1000 + t) for t in range(WINDOW)])
    old = event("old", "o", 1)  # older than the user's newest WINDOW events
    assert (await store.append([old])).stored == (True,)
    assert "old" not in [e.event_id for e in await store.history("u1")]  # outside the window ...
    assert (await store.history("u1", limit=100))[0] == old  # ... but stored
    for _ in range(2):  # and every retry is a duplicate
        assert (await store.append([old])).stored == (False,)


async def test_a_replay_after_250_newer_events_is_a_duplicate(store: HistoryStore):
    first = event("first", "a", 1)
    assert (await store.append([first])).accepted == 1
    newer = [event(f"e{i}", f"i{i}", 10 + i) for i in range(250)]
    for start in range(0, len(newer), 50):
        assert (await store.append(newer[start : start + 50])).accepted == 50
    assert (await store.append([first])).stored == (False,)
    assert [e.event_id for e in await store.history("u1", limit=1000)].count("first") == 1


async def test_the_same_event_id_under_another_user_is_a_duplicate(store: HistoryStore):
    assert (await store.append([event("shared", "a", 10, user_id="alice")])).accepted == 1
    for _ in range(2):
        result = await store.append([event("shared", "b", 20, user_id="bob")])
        assert (result.accepted, result.duplicates) == (0, 1)
    assert await store.history("bob", limit=100) == []
    # Within one call too: the first occurrence wins, whoever's it is.
    result = await store.append([event("x", "a", 30, user_id="bob"), event("x", "a", 30, user_id="carol")])
    assert result.stored == (True, False)


async def test_dedupe_records_expire_after_the_retention(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
):
    store = open_store(backend, request, tmp_path, retention_s=0.2)
    try:
        assert (await store.append([event("e1", "a", 10, user_id="alice")])).accepted == 1
        assert (await store.append([event("e1", "a", 10, user_id="bob")])).duplicates == 1
        await asyncio.sleep(0.4)
        # After the retention the id is free again: another user's event with it is accepted,
        assert (await store.append([event("e1", "a", 10, user_id="bob")])).accepted == 1
        # while the same user's event still in its window is not stored twice.
        await asyncio.sleep(0.4)
        assert (await store.append([event("e1", "a", 10, user_id="alice")])).duplicates == 1
        assert [e.event_id for e in await store.history("alice", limit=100)] == ["e1"]
    finally:
        await store.close()


async def test_events_outside_the_window_are_deleted_only_after_the_retention(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
):
    clock = FakeClock()
    store = open_store(backend, request, tmp_path, retention_s=3600, clock_ms=clock)
    try:
        await store.append([event(f"e{t}", f"i{t}", t) for t in range(WINDOW + 3)])
        clock.now_ms += 3_599_000  # within the retention: all stored
        await store.append([event("late", "x", 100)])
        assert len(await store.history("u1", limit=100)) == WINDOW + 4
        clock.now_ms += 2_000  # past it: events outside the window go, the window stays
        await store.append([event("later", "y", 101)])
        stored = await store.history("u1", limit=100)
        assert [e.event_id for e in stored] == ["e5", "e6", "e7", "late", "later"]
        assert stored == await store.history("u1")
    finally:
        await store.close()


async def test_forget_deletes_history_and_dedupe_records_and_lists_the_user(store: HistoryStore):
    await store.append([event(f"a{t}", f"i{t}", t, user_id="alice") for t in range(WINDOW + 2)])
    await store.append([event("b1", "x", 1, user_id="bob")])
    assert await store.forgotten_users() == {}

    assert await store.forget("alice") == WINDOW + 2  # the window and the older stored events
    assert await store.history("alice", limit=100) == []
    assert [e.event_id for e in await store.history("bob")] == ["b1"]  # others untouched
    assert list(await store.forgotten_users()) == ["alice"]
    # Her dedupe records are gone too: the ids are free, bob's are not.
    assert (await store.append([event("a0", "i0", 0, user_id="dave")])).accepted == 1
    assert (await store.append([event("b1", "x", 1, user_id="dave")])).duplicates == 1

    assert await store.forget("nobody") == 0
    assert list(await store.forgotten_users()) == ["alice", "nobody"]


def append_from_a_replica(path: str, replica: int, replicas: int, count: int) -> list[bool]:
    """One gateway replica's appends (run in its own process): ``count`` events of its own and,
    interleaved, the same ``count`` shared event ids every replica also sends. The replicas start
    together (each marks itself ready and waits for the others), so their writes overlap."""
    Path(f"{path}.ready-{replica}").touch()
    deadline = time.monotonic() + 60
    while not all(Path(f"{path}.ready-{other}").exists() for other in range(replicas)):
        assert time.monotonic() < deadline, "the other replica never started"
        time.sleep(0.005)

    async def run() -> list[bool]:
        store = SQLiteHistoryStore(path, 1000)
        stored = []
        for number in range(count):
            own = event(f"r{replica}-{number}", f"i{number}", number, user_id=f"user{number % 4}")
            shared = event(f"shared-{number}", f"s{number}", number, user_id="shared-user")
            stored.extend((await store.append([own, shared])).stored)
        await store.close()
        return stored

    return asyncio.run(run())


def test_replicas_in_separate_processes_share_one_sqlite_file_without_loss_or_double_counting(
    tmp_path: Path,
):
    """Gateway replicas of one host (one process per core) append to the same file at once:
    every event is stored once, and an event id sent to both is accepted by exactly one."""
    path = str(tmp_path / "history.sqlite3")
    SQLiteHistoryStore(path, 1000)  # the schema exists before the replicas race
    count, replicas = 150, 2
    context = multiprocessing.get_context("spawn")
    with context.Pool(replicas) as pool:
        results = pool.starmap(
            append_from_a_replica, [(path, replica, replicas, count) for replica in range(replicas)]
        )
    own = [flag for result in results for flag in result[0::2]]
    shared = [flag for result in results for flag in result[1::2]]
    assert all(own) and len(own) == replicas * count
    assert sum(shared) == count  # each shared id accepted once, whichever replica came first

    async def read() -> tuple[int, int]:
        store = SQLiteHistoryStore(path, 1000)
        users = [len(await store.history(f"user{user}", limit=10_000)) for user in range(4)]
        shared_user = len(await store.history("shared-user", limit=10_000))
        await store.close()
        return sum(users), shared_user

    assert asyncio.run(read()) == (replicas * count, count)


def test_sqlite_store_uses_wal_and_the_configured_synchronous_mode(tmp_path: Path):
    for mode, level in (("NORMAL", 1), ("full", 2)):
        store = SQLiteHistoryStore(tmp_path / f"h-{mode}.sqlite3", max_length=3, synchronous=mode)
        assert store._connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store._connection.execute("PRAGMA synchronous").fetchone()[0] == level
        asyncio.run(store.close())
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteHistoryStore(tmp_path / "off.sqlite3", max_length=3, synchronous="OFF")


async def test_a_sqlite_file_from_before_the_dedupe_records_keeps_its_history(tmp_path: Path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL,"
            " event_id TEXT NOT NULL, item_id TEXT NOT NULL, event_type INTEGER NOT NULL,"
            " timestamp_ms INTEGER NOT NULL, scenario TEXT NOT NULL DEFAULT '', UNIQUE (user_id, event_id))"
        )
        connection.execute("INSERT INTO events VALUES (1, 'u1', 'e1', 'a', 1, 10, '')")
    connection.close()
    store = SQLiteHistoryStore(path, max_length=WINDOW)
    try:
        assert [e.event_id for e in await store.history("u1")] == ["e1"]
        assert (await store.append([event("e1", "a", 10), event("e2", "b", 20)])).stored == (False, True)
        assert [e.event_id for e in await store.history("u1")] == ["e1", "e2"]
    finally:
        await store.close()


def test_open_history_store_rejects_unknown_backends(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown history backend"):
        open_history_store("memcached", 10)
    with pytest.raises(ValueError, match="redis URL"):
        open_history_store("redis", 10)
    store = open_history_store("sqlite", 10, sqlite_path=tmp_path / "x.db", sqlite_synchronous="FULL")
    assert isinstance(store, SQLiteHistoryStore)
    assert store._connection.execute("PRAGMA synchronous").fetchone()[0] == 2
    asyncio.run(store.close())
