"""The micro-batcher: concurrent submits share model runs, bounded by max_batch."""

from __future__ import annotations

import asyncio

import pytest

from recsys.serving.batching import MicroBatcher


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
