"""Micro-batching: concurrent requests are collected (up to a size or a wait) into one call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Query = TypeVar("Query")
Result = TypeVar("Result")


class MicroBatcher(Generic[Query, Result]):
    """Collects ``submit``-ted items into batches for ``run_batch`` (a blocking function run in a
    worker thread, one batch at a time).

    A batch is cut when it reaches ``max_batch`` items or when its oldest item has waited
    ``max_wait_ms``; while a batch runs, new items accumulate for the next one, so a busy service
    batches more. ``on_batch(size)`` observes each batch size.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[Query]], Sequence[Result]],
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.on_batch = on_batch
        self._pending: list[tuple[Query, asyncio.Future[Result], float]] = []
        self._full = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, query: Query) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._pending.append((query, future, loop.time()))
        if len(self._pending) >= self.max_batch:
            self._full.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            deadline = self._pending[0][2] + self.max_wait_s
            if len(self._pending) < self.max_batch and loop.time() < deadline:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), timeout=max(0.0, deadline - loop.time()))
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            live = [(query, future) for query, future, _ in batch if not future.done()]  # drop cancelled
            if not live:
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                results = await asyncio.to_thread(self.run_batch, [query for query, _ in live])
            except Exception as error:  # every caller of the batch gets the error
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
