"""Users' event logs and behaviour histories: an interface with two real backends.

- :class:`SQLiteHistoryStore` — embedded default (WAL), nothing to install; the gateway replicas of
  one host share its file (each append is one transaction, so another process's next read sees it).
  Blocking SQLite calls run in a worker thread behind a lock, so the event loop never blocks.
- :class:`RedisHistoryStore` — shared by a fleet of gateways, via ``redis.asyncio``; each
  ``append`` (all users of one ``LogEvents`` call, with their dedupe records) is one atomic Lua
  script.

What both backends guarantee:

- **Idempotency across users.** ``event_id`` is the idempotency key (the proto says so). Each
  accepted event leaves a dedupe record ``event_id -> user_id`` kept for ``retention_s`` after it
  arrived (default :data:`DEFAULT_RETENTION_S`, 7 days; the gateway's
  ``RECSYS_DEDUPE_RETENTION_HOURS``), independent of the history window: within that time a retry,
  a replay after any number of newer events, and the same id under another user are duplicates.
  Size it as (events per second) x retention ids, about 100 bytes each.
- **Every accepted event is stored** before ``append`` returns. The history window (a user's
  newest ``max_length`` events by timestamp) is a view of the stored events: an event older than
  the window is stored too. Events outside the window are deleted once older than ``retention_s``,
  so storage stays bounded by each user's window plus one retention period of traffic.
- **Durability** is the backend's: SQLite commits each append (WAL). With ``synchronous=NORMAL``
  (default) an acknowledged append survives a crash of the process; with ``FULL``
  (``RECSYS_SQLITE_SYNCHRONOUS=FULL``) it also survives power loss or an OS crash of the node.
  Redis is as durable as its server's persistence: ``appendonly yes`` with ``appendfsync always``
  writes each append to disk before replying; ``everysec`` survives a crash of the Redis process
  but may lose the last second on a power loss of its host.
- ``forget(user_id)`` deletes the user's events and dedupe records and adds the user to a
  forgotten-users list (:meth:`HistoryStore.forgotten_users`) that training exports read to
  exclude them.

Histories come back oldest first (by timestamp, then arrival).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RETENTION_S = 7 * 24 * 3600.0
# FULL for single-node durability (see the module docstring); OFF is refused, it can corrupt.
SQLITE_SYNCHRONOUS = ("NORMAL", "FULL", "EXTRA")
# Expired records examined per append: bounds an append's extra work, and keeps up with the
# insert rate because each append examines at least as many as it inserts.
PRUNE_BATCH = 1000


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


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
    """Durable, idempotent (by ``event_id`` across users) event logs with a per-user window."""

    def __init__(
        self,
        max_length: int,
        retention_s: float = DEFAULT_RETENTION_S,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        if not retention_s > 0:
            raise ValueError(f"retention_s must be > 0, got {retention_s}")
        self.max_length = max_length
        self.retention_ms = max(1, int(retention_s * 1000))
        self.clock_ms = clock_ms

    @abc.abstractmethod
    async def append(self, events: Sequence[StoredEvent]) -> AppendResult:
        """Store the events; an event whose id is already recorded (for any user) is a duplicate."""

    @abc.abstractmethod
    async def history(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        """The user's newest ``limit`` (default ``max_length``: the window) events, oldest first;
        a larger ``limit`` also reads stored events older than the window."""

    @abc.abstractmethod
    async def forget(self, user_id: str) -> int:
        """Delete the user's events and dedupe records, record the user as forgotten; returns the
        number of events deleted."""

    @abc.abstractmethod
    async def forgotten_users(self) -> dict[str, int]:
        """Forgotten user ids -> when they were last forgotten (ms since the epoch)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise when the backend is unusable."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


# A read on the event loop waits at most this long for a lock (only WAL recovery takes one).
READER_BUSY_TIMEOUT_MS = 50


class SQLiteHistoryStore(HistoryStore):
    """SQLite in WAL mode; one connection shared by worker threads behind a lock.

    Tables: ``events`` (every stored event), ``event_ids`` (the dedupe records) and
    ``forgotten_users``.
    """

    def __init__(
        self,
        path: str | Path,
        max_length: int,
        *,
        synchronous: str = "NORMAL",
        retention_s: float = DEFAULT_RETENTION_S,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ):
        super().__init__(max_length, retention_s, clock_ms)
        if synchronous.upper() not in SQLITE_SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SQLITE_SYNCHRONOUS}, got {synchronous!r}")
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        with self._lock:
            connection = self._connection
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(f"PRAGMA synchronous={synchronous.upper()}")
            connection.execute("PRAGMA busy_timeout=5000")
            connection.execute(
                """CREATE TABLE IF NOT EXISTS events (
                       seq INTEGER PRIMARY KEY AUTOINCREMENT,
                       user_id TEXT NOT NULL,
                       event_id TEXT NOT NULL,
                       item_id TEXT NOT NULL,
                       event_type INTEGER NOT NULL,
                       timestamp_ms INTEGER NOT NULL,
                       scenario TEXT NOT NULL DEFAULT '',
                       received_ms INTEGER NOT NULL DEFAULT 0,
                       UNIQUE (user_id, event_id))"""
            )
            columns = {row[1] for row in connection.execute("PRAGMA table_info(events)")}
            if "received_ms" not in columns:  # a file written before the dedupe records existed
                connection.execute("ALTER TABLE events ADD COLUMN received_ms INTEGER NOT NULL DEFAULT 0")
            connection.execute(
                "CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, timestamp_ms, seq)"
            )
            connection.execute(
                """CREATE TABLE IF NOT EXISTS event_ids (
                       event_id TEXT PRIMARY KEY,
                       user_id TEXT NOT NULL,
                       received_ms INTEGER NOT NULL) WITHOUT ROWID"""
            )
            connection.execute("CREATE INDEX IF NOT EXISTS event_ids_by_age ON event_ids (received_ms)")
            connection.execute("CREATE INDEX IF NOT EXISTS event_ids_by_user ON event_ids (user_id)")
            connection.execute(
                "CREATE TABLE IF NOT EXISTS forgotten_users ("
                " user_id TEXT PRIMARY KEY, forgotten_ms INTEGER NOT NULL) WITHOUT ROWID"
            )
        # Reads of a file database run on the event loop through their own connection: one indexed
        # read of the WAL's last committed snapshot (microseconds, never waiting for the writer),
        # where a worker-thread hop costs thread wake-ups that an idle VM makes tens of
        # milliseconds. An in-memory database has one connection: reads go through the lock.
        self._reader: sqlite3.Connection | None = None
        if self.path != ":memory:":
            self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._reader.execute("PRAGMA query_only=ON")
            self._reader.execute(f"PRAGMA busy_timeout={READER_BUSY_TIMEOUT_MS}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed (and, per ``synchronous``, on disk) when the block ends."""
        with self._lock:
            connection = self._connection
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _append(self, events: Sequence[StoredEvent]) -> AppendResult:
        now_ms = self.clock_ms()
        cutoff_ms = now_ms - self.retention_ms
        stored = []
        with self._transaction() as connection:
            connection.execute(
                "DELETE FROM event_ids WHERE event_id IN (SELECT event_id FROM event_ids"
                " WHERE received_ms < ? ORDER BY received_ms LIMIT ?)",
                (cutoff_ms, PRUNE_BATCH + len(events)),
            )
            for event in events:
                recorded = connection.execute(
                    "INSERT OR IGNORE INTO event_ids (event_id, user_id, received_ms) VALUES (?, ?, ?)",
                    (event.event_id, event.user_id, now_ms),
                )
                if recorded.rowcount != 1:
                    stored.append(False)
                    continue
                # A same-user event whose dedupe record expired may still be stored: ignored.
                inserted = connection.execute(
                    "INSERT OR IGNORE INTO events (user_id, event_id, item_id, event_type, timestamp_ms,"
                    " scenario, received_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        event.user_id,
                        event.event_id,
                        event.item_id,
                        event.event_type,
                        event.timestamp_ms,
                        event.scenario,
                        now_ms,
                    ),
                )
                stored.append(inserted.rowcount == 1)
            for user_id in {event.user_id for event in events}:
                connection.execute(
                    "DELETE FROM events WHERE user_id = ? AND received_ms < ? AND seq NOT IN (SELECT seq"
                    " FROM events WHERE user_id = ? ORDER BY timestamp_ms DESC, seq DESC LIMIT ?)",
                    (user_id, cutoff_ms, user_id, self.max_length),
                )
        return AppendResult(tuple(stored))

    def _history(self, user_id: str, limit: int) -> list[StoredEvent]:
        with self._lock:
            return self._read_history(self._connection, user_id, limit)

    @staticmethod
    def _read_history(connection: sqlite3.Connection, user_id: str, limit: int) -> list[StoredEvent]:
        rows = connection.execute(
            "SELECT event_id, item_id, event_type, timestamp_ms, scenario FROM events WHERE user_id = ?"
            " ORDER BY timestamp_ms DESC, seq DESC LIMIT ?",
            (user_id, limit),
        ).fetchall()
        return [StoredEvent(row[0], user_id, row[1], row[2], row[3], row[4]) for row in reversed(rows)]

    def _forget(self, user_id: str) -> int:
        with self._transaction() as connection:
            deleted = connection.execute("DELETE FROM events WHERE user_id = ?", (user_id,)).rowcount
            connection.execute("DELETE FROM event_ids WHERE user_id = ?", (user_id,))
            connection.execute(
                "INSERT INTO forgotten_users (user_id, forgotten_ms) VALUES (?, ?)"
                " ON CONFLICT (user_id) DO UPDATE SET forgotten_ms = excluded.forgotten_ms",
                (user_id, self.clock_ms()),
            )
        return deleted

    def _read(self, query: str) -> list[tuple]:
        with self._lock:
            return self._connection.execute(query).fetchall()

    async def append(self, events: Sequence[StoredEvent]) -> AppendResult:
        if not events:
            return AppendResult(())
        return await asyncio.to_thread(self._append, list(events))

    async def history(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        if self._reader is not None:
            return self._read_history(self._reader, user_id, limit or self.max_length)
        return await asyncio.to_thread(self._history, user_id, limit or self.max_length)

    async def forget(self, user_id: str) -> int:
        return await asyncio.to_thread(self._forget, user_id)

    async def forgotten_users(self) -> dict[str, int]:
        rows = await asyncio.to_thread(self._read, "SELECT user_id, forgotten_ms FROM forgotten_users")
        return dict(sorted(rows))

    async def ping(self) -> None:
        await asyncio.to_thread(self._read, "SELECT 1")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        with self._lock:
            self._connection.close()


# One call for a whole append. KEYS, per event: its dedupe record (string: user id, expires after
# the retention), its user's events hash (event id -> JSON) and order zset (event ids by timestamp).
# ARGV: max length, now (ms), retention (ms); then per event (event id, user id, timestamp, JSON).
# Returns 1 (stored) or 0 (duplicate) per event. Then, per user, events outside the window (the
# oldest by timestamp) that arrived before the retention cutoff are deleted.
_APPEND_SCRIPT = f"""
local max_length = tonumber(ARGV[1])
local cutoff = tonumber(ARGV[2]) - tonumber(ARGV[3])
local stored = {{}}
local users = {{}}
for i = 0, #KEYS / 3 - 1 do
  local dedupe, events, order = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local event_id = ARGV[4 * i + 4]
  local new = 0
  if redis.call('SET', dedupe, ARGV[4 * i + 5], 'NX', 'PX', ARGV[3]) then
    if redis.call('HSETNX', events, event_id, ARGV[4 * i + 7]) == 1 then
      redis.call('ZADD', order, ARGV[4 * i + 6], event_id)
      new = 1
    end
  end
  stored[#stored + 1] = new
  users[events] = order
end
for events, order in pairs(users) do
  local excess = redis.call('ZCARD', order) - max_length
  if excess > 0 then
    local oldest = redis.call('ZRANGE', order, 0, math.min(excess, {PRUNE_BATCH}) - 1)
    local payloads = redis.call('HMGET', events, unpack(oldest))
    for j, event_id in ipairs(oldest) do
      if not payloads[j] or (cjson.decode(payloads[j])[5] or 0) < cutoff then
        redis.call('ZREM', order, event_id)
        redis.call('HDEL', events, event_id)
      end
    end
  end
end
return stored
"""

# KEYS: the user's events hash, order zset, and the forgotten-users hash. ARGV: user id, now (ms),
# the dedupe key prefix. The user's dedupe records are found through their stored events (an
# event leaves the store only after its dedupe record expired). Returns the events deleted.
_FORGET_SCRIPT = """
local event_ids = redis.call('HKEYS', KEYS[1])
for _, event_id in ipairs(event_ids) do
  local dedupe = ARGV[3] .. event_id
  if redis.call('GET', dedupe) == ARGV[1] then
    redis.call('DEL', dedupe)
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return #event_ids
"""


class RedisHistoryStore(HistoryStore):
    """Redis: per user a hash (event id -> event) and a sorted set (event ids by timestamp); per
    event id a dedupe key that expires after the retention; a hash of forgotten users.

    An append touches several users' keys and the dedupe keys in one script, so all keys must be
    on one node: a standalone/primary Redis, or for Redis Cluster a ``key_prefix`` with a hash tag
    (``{recsys}:history:``). Durability needs the server's ``appendonly yes`` (see the module
    docstring for ``appendfsync``).
    """

    def __init__(
        self,
        url: str,
        max_length: int,
        key_prefix: str = "recsys:history:",
        timeout_s: float = 0.5,
        *,
        retention_s: float = DEFAULT_RETENTION_S,
        clock_ms: Callable[[], int] = wall_clock_ms,
    ):
        super().__init__(max_length, retention_s, clock_ms)
        import redis.asyncio as redis_asyncio

        self.url = url
        self.key_prefix = key_prefix
        # Bounded socket timeouts: a stalled Redis must fail a request's history read, not hang it.
        self._client = redis_asyncio.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._append_script = self._client.register_script(_APPEND_SCRIPT)
        self._forget_script = self._client.register_script(_FORGET_SCRIPT)

    def _keys(self, user_id: str) -> list[str]:
        # Key names kept from earlier versions so existing histories stay readable.
        return [f"{self.key_prefix}{{{user_id}}}:events", f"{self.key_prefix}{{{user_id}}}:order"]

    @property
    def _dedupe_prefix(self) -> str:
        return f"{self.key_prefix}event-id:"

    @property
    def _forgotten_key(self) -> str:
        return f"{self.key_prefix}forgotten-users"

    async def append(self, events: Sequence[StoredEvent]) -> AppendResult:
        if not events:
            return AppendResult(())
        now_ms = self.clock_ms()
        keys: list[str] = []
        args: list[str | int] = [self.max_length, now_ms, self.retention_ms]
        for event in events:
            keys += [self._dedupe_prefix + event.event_id, *self._keys(event.user_id)]
            payload = json.dumps(
                [event.item_id, event.event_type, event.timestamp_ms, event.scenario, now_ms],
                separators=(",", ":"),
            )
            args += [event.event_id, event.user_id, event.timestamp_ms, payload]
        flags = await self._append_script(keys=keys, args=args)
        return AppendResult(tuple(bool(int(flag)) for flag in flags))

    async def history(self, user_id: str, limit: int | None = None) -> list[StoredEvent]:
        limit = limit or self.max_length
        events_key, order_key = self._keys(user_id)
        event_ids = await self._client.zrange(order_key, -limit, -1)
        if not event_ids:
            return []
        payloads = await self._client.hmget(events_key, event_ids)
        history = []
        for event_id, payload in zip(event_ids, payloads, strict=True):
            if payload is None:  # deleted between the two reads
                continue
            item_id, event_type, timestamp_ms, scenario = json.loads(payload)[:4]
            history.append(StoredEvent(event_id, user_id, item_id, event_type, timestamp_ms, scenario))
        return history

    async def forget(self, user_id: str) -> int:
        keys = [*self._keys(user_id), self._forgotten_key]
        args = [user_id, self.clock_ms(), self._dedupe_prefix]
        return int(await self._forget_script(keys=keys, args=args))

    async def forgotten_users(self) -> dict[str, int]:
        forgotten = await self._client.hgetall(self._forgotten_key)
        return {user_id: int(forgotten[user_id]) for user_id in sorted(forgotten)}

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()


def open_history_store(
    backend: str,
    max_length: int,
    sqlite_path: str | Path = "",
    redis_url: str = "",
    *,
    sqlite_synchronous: str = "NORMAL",
    retention_s: float = DEFAULT_RETENTION_S,
) -> HistoryStore:
    """The configured backend: ``sqlite`` (default) or ``redis``."""
    if backend == "sqlite":
        return SQLiteHistoryStore(
            sqlite_path or ":memory:", max_length, synchronous=sqlite_synchronous, retention_s=retention_s
        )
    if backend == "redis":
        if not redis_url:
            raise ValueError("history backend redis needs a redis URL (RECSYS_REDIS_URL)")
        return RedisHistoryStore(redis_url, max_length, retention_s=retention_s)
    raise ValueError(f"unknown history backend {backend!r}: sqlite or redis")
