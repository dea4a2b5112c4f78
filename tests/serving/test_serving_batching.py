"""The micro-batcher: concurrent submits share model runs, bounded by max_batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from recsys.serving.batching import BatchThread, DeadlineExpired, MicroBatcher, QueueFull


async def test_concurrent_requests_share_batches_and_keep_their_results():
    sizes: list[int] = []
    batcher = MicroBatcher(
        lambda batch: [value * 10 for value in batch], max_batch=4, max_wait_ms=50, on_batch=sizes.append
    )
    results = await asyncio.gather(*(batcher.submit(value) for value in range(10)))
    assert results == [value * 10 for value in range(10)]
    assert max(sizes) == 4 and sum(sizes) == 10 and len(sizes) == 3


async def test_a_lone_request_does_not_wait_for_a_full_batch():
    batcher = MicroBatcher(lambda batch: list(batch), max_batch=64, max_wait_ms=5)
    assert await asyncio.wait_for(batcher.submit("alone"), timeout=1.0) == "alone"


async def test_a_failing_batch_fails_its_callers_and_the_next_batch_runs():
    def run(batch):
        if "bad" in batch:
            raise ValueError("model failed")
        return list(batch)

    batcher = MicroBatcher(run, max_batch=8, max_wait_ms=20)
    outcomes = await asyncio.gather(batcher.submit("bad"), batcher.submit("ok"), return_exceptions=True)
    assert all(isinstance(outcome, ValueError) for outcome in outcomes)
    assert await batcher.submit("fine") == "fine"


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError):
        MicroBatcher(lambda batch: batch, max_batch=0, max_wait_ms=1)


async def test_an_idle_batcher_dispatches_at_once_even_with_a_wait_window_of_zero():
    seen: list[list[str]] = []

    def run(batch):
        seen.append(list(batch))
        return list(batch)

    batcher = MicroBatcher(run, max_batch=64)  # max_wait_ms defaults to 0: no window at all
    assert await asyncio.wait_for(batcher.submit("alone"), timeout=1.0) == "alone"
    assert seen == [["alone"]]


async def test_requests_arriving_while_a_batch_runs_form_the_next_batch():
    release = threading.Event()
    sizes: list[int] = []

    def run(batch):
        if batch == ["first"]:
            release.wait(5)
        return list(batch)

    batcher = MicroBatcher(run, max_batch=8, on_batch=sizes.append)
    first = asyncio.ensure_future(batcher.submit("first"))
    while not sizes:  # the first batch is running in the worker thread
        await asyncio.sleep(0.001)
    rest = [asyncio.ensure_future(batcher.submit(f"r{i}")) for i in range(5)]
    await asyncio.sleep(0.01)
    assert batcher.queued == 5
    release.set()
    assert await first == "first"
    assert await asyncio.gather(*rest) == [f"r{i}" for i in range(5)]
    assert sizes == [1, 5]


async def test_a_full_queue_sheds_at_once_and_counts_the_rejection():
    release = threading.Event()
    rejected: list[str] = []

    def run(batch):
        release.wait(5)
        return list(batch)

    batcher = MicroBatcher(run, max_batch=1, max_queue=2, on_reject=rejected.append)
    running = asyncio.ensure_future(batcher.submit("running"))
    await asyncio.sleep(0.01)
    waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await batcher.submit("one too many")
    assert rejected == ["QueueFull"]
    release.set()
    assert await running == "running" and await asyncio.gather(*waiting) == [0, 1]


async def test_a_request_whose_deadline_passed_while_queued_is_dropped_unrun():
    release = threading.Event()
    computed: list[str] = []
    waits: list[float] = []

    def run(batch):
        computed.extend(batch)
        release.wait(5)
        return list(batch)

    batcher = MicroBatcher(run, max_batch=4, on_queue_wait=waits.append)
    loop = asyncio.get_running_loop()
    running = asyncio.ensure_future(batcher.submit("running"))
    await asyncio.sleep(0.01)
    expired = asyncio.ensure_future(batcher.submit("late", deadline=loop.time() + 0.01))
    alive = asyncio.ensure_future(batcher.submit("on time", deadline=loop.time() + 30))
    await asyncio.sleep(0.05)  # "late" passes its deadline while "running" holds the worker
    release.set()
    assert await running == "running" and await alive == "on time"
    with pytest.raises(DeadlineExpired):
        await expired
    assert computed == ["running", "on time"]
    assert len(waits) == 2 and waits[1] >= 0.04  # "on time" waited for the running batch


async def test_the_batch_thread_runs_its_initializer_once_on_itself_and_hands_back_results_and_errors():
    seen: list[str] = []
    worker = BatchThread("test-batch", initializer=lambda: seen.append(threading.current_thread().name))
    try:
        assert await worker.run(lambda a, b: (a + b, threading.current_thread().name), 2, 3) == (
            5,
            "test-batch",
        )
        with pytest.raises(KeyError):
            await worker.run(lambda: {}["missing"])
        assert await asyncio.gather(*(worker.run(lambda v=v: v * 2) for v in range(20))) == list(
            range(0, 40, 2)
        )
        assert seen == ["test-batch"]
    finally:
        worker.close()


async def test_a_cancelled_caller_does_not_stop_the_batch_thread():
    release = threading.Event()
    worker = BatchThread("test-batch")
    try:
        slow = asyncio.ensure_future(worker.run(release.wait))
        await asyncio.sleep(0.01)
        slow.cancel()
        release.set()
        assert await asyncio.wait_for(worker.run(lambda: "next"), timeout=5) == "next"
    finally:
        worker.close()


async def test_closing_the_batch_thread_ends_it_after_the_running_call():
    worker = BatchThread("test-batch-closed")
    assert await worker.run(lambda: 1) == 1
    (thread,) = [t for t in threading.enumerate() if t.name == "test-batch-closed"]
    worker.close()
    thread.join(timeout=5)
    assert not thread.is_alive()
