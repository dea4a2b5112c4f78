"""Memory: 10,000 Recommend calls through a real gateway (fake downstreams, stored and stateless
histories, every shipped scenario) leave the process's resident memory within a stated bound."""

from __future__ import annotations

import asyncio
import gc
from collections import deque
from pathlib import Path

import pytest
import yaml

from gateway.config import DEFAULT_SCENARIOS
from recsys.v1 import common_pb2, gateway_pb2
from tests.gateway.conftest import FakeStack, stretch_budgets

pytestmark = pytest.mark.integration

WARMUP_CALLS = 1_000
MEASURED_CALLS = 10_000
CONCURRENCY = 25
RSS_GROWTH_BOUND_MB = 25.0  # allocator slack and metric children, not per-request state
BUDGET_SCALE = 20  # memory is measured here, not latency: a starved CI core must not trip a stage deadline


@pytest.fixture
def fake_stack_overrides(tmp_path: Path) -> dict:
    """Every shipped scenario, its stages unchanged, with budgets a stalled event loop cannot exceed
    (the full path must answer every call: a degraded answer would skip the code under test)."""
    scenarios = tmp_path / "scenarios.yaml"
    shipped = yaml.safe_load(DEFAULT_SCENARIOS.read_text())
    scenarios.write_text(yaml.safe_dump(stretch_budgets(shipped, BUDGET_SCALE)))
    return {"scenarios_path": scenarios, "default_deadline_ms": 1000.0 * BUDGET_SCALE}


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this platform")
    return 0.0


def request(number: int) -> gateway_pb2.RecommendRequest:
    scenario = ("home", "item_detail", "cart", "category", "ads")[number % 5]
    history = (
        [common_pb2.HistoryItem(item_id=f"i{(number + k) % 200}", type=common_pb2.VIEW) for k in range(5)]
        if number % 2
        else []
    )
    return gateway_pb2.RecommendRequest(
        request_id=f"memory-{number}",
        user_id=f"u{number % 300}",
        scenario=scenario,
        num_items=20,
        context=gateway_pb2.RecommendContext(
            item_ids=[f"i{number % 200}"] if scenario in ("item_detail", "cart") else [],
            category=f"c{number % 5}" if scenario == "category" else "",
        ),
        history=history,
    )


async def run_calls(stack: FakeStack, start: int, count: int) -> None:
    numbers = iter(range(start, start + count))

    async def worker() -> None:
        for number in numbers:
            response = await stack.stub.Recommend(request(number), timeout=10)
            assert response.items and not response.degraded, response.degraded_reasons

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def test_ten_thousand_requests_keep_memory_within_the_bound(fake_stack: FakeStack):
    for fake in (fake_stack.fake_recall, fake_stack.fake_rank):  # the fakes' own call log is bounded
        fake.behaviour.requests = deque(maxlen=10)
        fake.behaviour.time_remaining = deque(maxlen=10)
    await run_calls(fake_stack, 0, WARMUP_CALLS)
    gc.collect()
    # As every server does after warm-up (recsys/serving/bootstrap.py): the objects alive now are never
    # scanned again, so a full collection over this test process's large heap (every module the
    # suite imported) cannot stall the event loop past the 100 ms history budget.
    gc.freeze()
    try:
        before = resident_mb()
        await run_calls(fake_stack, WARMUP_CALLS, MEASURED_CALLS)
        gc.collect()
        growth = resident_mb() - before
    finally:
        gc.unfreeze()
    print(f"RSS {before:.1f} MB -> {before + growth:.1f} MB over {MEASURED_CALLS} requests")
    assert growth < RSS_GROWTH_BOUND_MB, f"RSS grew {growth:.1f} MB over {MEASURED_CALLS} requests"
