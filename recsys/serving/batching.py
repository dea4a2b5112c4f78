"""Micro-batching of concurrent requests: one model run for the requests that arrive together.

A batch runs when ``max_batch`` requests are queued or its oldest request has waited
``max_wait_ms``; batches run one at a time in a worker thread, so requests arriving meanwhile
form the next batch (and do not wait again if they already waited that long).
The worker task exists only while requests are queued (nothing to stop at shutdown).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Result = TypeVar("Result")


class MicroBatcher(Generic[Request, Result]):
    """Collects concurrent ``submit`` calls into batches for ``run_batch`` (called in a thread)."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Request]], Sequence[Result]],
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] | None = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: list[tuple[Request, asyncio.Future[Result], float]] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, request: Request) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append((request, future, loop.time()))
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.ensure_future(self._work())
        return await future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            deadline = self._queue[0][2] + self._max_wait
            while len(self._queue) < self._max_batch and self._max_wait > 0:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                assert self._wakeup is not None
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            batch = [(request, future) for request, future, _ in batch if not future.cancelled()]
            if not batch:
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch))
            try:
                results = await asyncio.to_thread(self._run_batch, [request for request, _ in batch])
            except Exception as error:  # every caller of the failed batch gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
