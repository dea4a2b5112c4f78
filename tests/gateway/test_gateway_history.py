"""History stores: both backends idempotent by event id, capped, oldest first, per user."""

from __future__ import annotations

import asyncio
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


@pytest.fixture(params=["sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        history_store: HistoryStore = SQLiteHistoryStore(tmp_path / "history.sqlite3", max_length=5)
    else:
        redis_url = request.getfixturevalue("redis_url")
        history_store = RedisHistoryStore(redis_url, max_length=5, key_prefix=f"test-{uuid.uuid4().hex}:")
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
        assert len(await store.history(f"user{user}")) == 5


def test_sqlite_store_uses_wal(tmp_path: Path):
    store = SQLiteHistoryStore(tmp_path / "h.sqlite3", max_length=3)
    mode = store._connection.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    asyncio.run(store.close())


def test_open_history_store_rejects_unknown_backends(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown history backend"):
        open_history_store("memcached", 10)
    with pytest.raises(ValueError, match="redis URL"):
        open_history_store("redis", 10)
    assert isinstance(open_history_store("sqlite", 10, sqlite_path=tmp_path / "x.db"), SQLiteHistoryStore)
