"""Users' behaviour histories: an interface with two real backends.

- :class:`SQLiteHistoryStore` — embedded default (WAL), nothing to install. Blocking SQLite calls
  run in a worker thread behind a lock, so the event loop never blocks on disk.
- :class:`RedisHistoryStore` — for a cluster of gateways, via ``redis.asyncio``; each user's
  append is one atomic Lua script.

Both are idempotent by ``(user_id, event_id)`` within the retained window, keep at most
``max_length`` events per user (the newest), and return histories oldest first (by timestamp,
then arrival).
"""

from __future__ import annotations

import abc
import asyncio
import json
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StoredEvent:
    """One event as the store keeps it (``event_type`` is the ``recsys.v1.EventType`` value)."""

    event_id: str
    user_id: str
    item_id: str
    event_type: int
    timestamp_ms: int
    scenario: str = ""


@dataclass(frozen=True)
class AppendResult:
    """Per appended event, in order: True when newly stored, False when a duplicate."""

    stored: tuple[bool, ...]

    @property
    def accepted(self) -> int:
        return sum(self.stored)

    @property
    def duplicates(self) -> int:
        return len(self.stored) - self.accepted


class HistoryStore(abc.ABC):
    """Append-only, capped, idempotent per-user event histories."""

    def __init__(self, max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.max_length = max_length

    @abc.abstractmethod
    async def append(self, events: Sequence[StoredEvent]) -> AppendResult:
        """Store the events; events whose id the user already has are counted as duplicates."""

    @abc.abstractmethod
    async def history(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        """The user's newest ``limit`` (default ``max_length``) events, oldest first."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise when the backend is unusable."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class SQLiteHistoryStore(HistoryStore):
    """SQLite in WAL mode; one connection shared by worker threads behind a lock."""

    def __init__(self, path: str | Path, max_length: int):
        super().__init__(max_length)
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with self._lock:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute("PRAGMA busy_timeout=5000")
            self._connection.execute(
                """CREATE TABLE IF NOT EXISTS events (
                       seq INTEGER PRIMARY KEY AUTOINCREMENT,
                       user_id TEXT NOT NULL,
                       event_id TEXT NOT NULL,
                       item_id TEXT NOT NULL,
                       event_type INTEGER NOT NULL,
                       timestamp_ms INTEGER NOT NULL,
                       scenario TEXT NOT NULL DEFAULT '',
                       UNIQUE (user_id, event_id))"""
            )
            self._connection.execute(
                "CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, timestamp_ms, seq)"
            )

    def _append(self, events: Sequence[StoredEvent]) -> AppendResult:
        stored = []
        with self._lock:
            connection = self._connection
            connection.execute("BEGIN IMMEDIATE")
            try:
                for event in events:
                    cursor = connection.execute(
                        "INSERT OR IGNORE INTO events (user_id, event_id, item_id, event_type, timestamp_ms,"
                        " scenario) VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            event.user_id,
                            event.event_id,
                            event.item_id,
                            event.event_type,
                            event.timestamp_ms,
                            event.scenario,
                        ),
                    )
                    stored.append(cursor.rowcount == 1)
                for user_id in {event.user_id for event in events}:
                    connection.execute(
                        "DELETE FROM events WHERE user_id = ? AND seq NOT IN (SELECT seq FROM events"
                        " WHERE user_id = ? ORDER BY timestamp_ms DESC, seq DESC LIMIT ?)",
                        (user_id, user_id, self.max_length),
                    )
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return AppendResult(tuple(stored))

    def _history(self, user_id: str, limit: int) -> list[StoredEvent]:
        with self._lock:
            rows = self._connection.execute(
                "SELECT event_id, item_id, event_type, timestamp_ms, scenario FROM events WHERE user_id = ?"
                " ORDER BY timestamp_ms DESC, seq DESC LIMIT ?",
                (user_id, limit),
            ).fetchall()
        return [StoredEvent(row[0], user_id, row[1], row[2], row[3], row[4]) for row in reversed(rows)]

    async def append(self, events: Sequence[StoredEvent]) -> AppendResult:
        if not events:
            return AppendResult(())
        return await asyncio.to_thread(self._append, list(events))

    async def history(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        return await asyncio.to_thread(self._history, user_id, min(limit or self.max_length, self.max_length))

    async def ping(self) -> None:
        def _ping() -> None:
            with self._lock:
                self._connection.execute("SELECT 1").fetchone()

        await asyncio.to_thread(_ping)

    async def close(self) -> None:
        with self._lock:
            self._connection.close()


# KEYS[1]: hash event_id -> event JSON; KEYS[2]: sorted set of event ids scored by timestamp.
# ARGV[1]: max length; then (event_id, timestamp_ms, json) triples. Returns 1 (new) or 0 per event.
_APPEND_SCRIPT = """
local stored = {}
for i = 2, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 2]) == 1 then
    redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
    stored[#stored + 1] = 1
  else
    stored[#stored + 1] = 0
  end
end
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[1])
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, excess - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, excess - 1)
  redis.call('HDEL', KEYS[1], unpack(old))
end
return stored
"""


class RedisHistoryStore(HistoryStore):
    """Redis: per user a hash (event id -> event) and a sorted set (event ids by timestamp)."""

    def __init__(
        self, url: str, max_length: int, key_prefix: str = "recsys:history:", timeout_s: float = 0.5
    ):
        super().__init__(max_length)
        import redis.asyncio as redis_asyncio

        self.url = url
        self.key_prefix = key_prefix
        # Bounded socket timeouts: a stalled Redis must fail a request's history read, not hang it.
        self._client = redis_asyncio.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._append_script = self._client.register_script(_APPEND_SCRIPT)

    def _keys(self, user_id: str) -> list[str]:
        # The hash tag keeps a user's two keys in one Redis Cluster slot.
        return [f"{self.key_prefix}{{{user_id}}}:events", f"{self.key_prefix}{{{user_id}}}:order"]

    async def append(self, events: Sequence[StoredEvent]) -> AppendResult:
        by_user: dict[str, list[int]] = defaultdict(list)  # user -> positions in ``events``
        for position, event in enumerate(events):
            by_user[event.user_id].append(position)
        stored = [False] * len(events)
        for user_id, positions in by_user.items():
            args: list[str | int] = [self.max_length]
            for event in (events[p] for p in positions):
                payload = json.dumps(
                    [event.item_id, event.event_type, event.timestamp_ms, event.scenario],
                    separators=(",", ":"),
                )
                args += [event.event_id, event.timestamp_ms, payload]
            flags = await self._append_script(keys=self._keys(user_id), args=args)
            for position, flag in zip(positions, flags, strict=True):
                stored[position] = bool(int(flag))
        return AppendResult(tuple(stored))

    async def history(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        limit = min(limit or self.max_length, self.max_length)
        events_key, order_key = self._keys(user_id)
        event_ids = await self._client.zrange(order_key, -limit, -1)
        if not event_ids:
            return []
        payloads = await self._client.hmget(events_key, event_ids)
        history = []
        for event_id, payload in zip(event_ids, payloads, strict=True):
            if payload is None:  # trimmed between the two reads
                continue
            item_id, event_type, timestamp_ms, scenario = json.loads(payload)
            history.append(StoredEvent(event_id, user_id, item_id, event_type, timestamp_ms, scenario))
        return history

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()


def open_history_store(
    backend: str, max_length: int, sqlite_path: str | Path = "", redis_url: str = ""
) -> HistoryStore:
    """The configured backend: ``sqlite`` (default) or ``redis``."""
    if backend == "sqlite":
        return SQLiteHistoryStore(sqlite_path or ":memory:", max_length)
    if backend == "redis":
        if not redis_url:
            raise ValueError("history backend redis needs a redis URL (RECSYS_REDIS_URL)")
        return RedisHistoryStore(redis_url, max_length)
    raise ValueError(f"unknown history backend {backend!r}: sqlite or redis")
