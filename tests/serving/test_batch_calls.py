"""The caller's side of batch calls (recsys.serving.batch_calls.CallCoalescer): when it sends, what
goes together, and that every request gets its own answer, error or deadline."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest

from recsys.serving.batch_calls import CallCoalescer, Pending, member_deadlines
from recsys.serving.validation import InvalidArgument, rpc_error
from recsys.v1 import common_pb2

OK = common_pb2.CallStatus(code=0)


class FakeService:
    """A stub's plain and batch methods; ``gate`` (when set) holds every call until it opens,
    ``batch_gate`` (when set) the batch calls instead."""

    def __init__(self) -> None:
        self.single_calls: list[tuple[str, float | None]] = []
        self.batch_calls: list[SimpleNamespace] = []
        self.batch_timeouts: list[float | None] = []
        self.gate: asyncio.Event | None = None
        self.batch_gate: asyncio.Event | None = None
        self.batch_error: grpc.aio.AioRpcError | None = None
        self.statuses: dict[str, common_pb2.CallStatus] = {}  # request -> its status in a batch
        self.short_answer = False

    async def single(self, request: str, timeout: float | None = None, metadata=None) -> str:
        self.single_calls.append((request, timeout))
        if self.gate is not None:
            await self.gate.wait()
        return f"answer to {request}"

    async def batch(self, batch_request: SimpleNamespace, timeout: float | None = None, metadata=None):
        self.batch_calls.append(batch_request)
        self.batch_timeouts.append(timeout)
        gate = self.batch_gate or self.gate
        if gate is not None:
            await gate.wait()
        if self.batch_error is not None:
            raise self.batch_error
        requests = batch_request.requests[:-1] if self.short_answer else batch_request.requests
        return SimpleNamespace(
            responses=[f"answer to {r}" for r in requests],
            statuses=[self.statuses.get(r, OK) for r in requests],
        )


def coalescer(service: FakeService, sizes: list[int] | None = None, **options) -> CallCoalescer:
    return CallCoalescer(
        service.single,
        service.batch,
        lambda requests, budgets: SimpleNamespace(requests=requests, budgets_ms=budgets),
        max_in_flight=options.pop("max_in_flight", 1),
        on_call=None if sizes is None else sizes.append,
        service="fake",
        **options,
    )


async def settle_loop() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def queue(calls: CallCoalescer, *requests: str, timeout: float = 5) -> list[asyncio.Future]:
    """Calls for ``requests``, started and left waiting."""
    waiting = [asyncio.ensure_future(calls(request, timeout=timeout)) for request in requests]
    await settle_loop()
    return waiting


async def occupy(service: FakeService, calls: CallCoalescer) -> asyncio.Task:
    """A first request whose plain call stays out until ``service.gate`` opens."""
    service.gate = asyncio.Event()
    first = asyncio.ensure_future(calls("r0", timeout=5))
    await settle_loop()
    assert calls.in_flight == 1
    return first


async def test_a_lone_request_is_a_plain_call_sent_at_once() -> None:
    service, sizes = FakeService(), []
    calls = coalescer(service, sizes)
    assert await calls("r1", timeout=2) == "answer to r1"
    assert [request for request, _ in service.single_calls] == ["r1"]
    assert 1.0 < service.single_calls[0][1] <= 2  # its own timeout (a starved CI loop may lag)
    assert not service.batch_calls and sizes == [1]


async def test_requests_arriving_while_a_call_is_out_go_together_in_one_batch_call() -> None:
    service, sizes = FakeService(), []
    calls = coalescer(service, sizes)
    first = await occupy(service, calls)
    waiting = await queue(calls, "r1", "r2", "r3")
    assert calls.queued == 3 and not service.batch_calls  # nothing sent past the in-flight limit
    service.gate.set()
    assert await first == "answer to r0"
    assert await asyncio.gather(*waiting) == ["answer to r1", "answer to r2", "answer to r3"]
    assert [call.requests for call in service.batch_calls] == [["r1", "r2", "r3"]]
    assert sizes == [1, 3]
    budgets = service.batch_calls[0].budgets_ms
    assert len(budgets) == 3 and all(4000 < budget <= 5000 for budget in budgets)


async def test_a_batch_whose_requests_all_ended_before_it_went_out_sends_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Between being taken off the queue and going out, every request of a batch may expire or be
    # cancelled (a client gone at shutdown): nothing is sent, nothing logged as a failure.
    service = FakeService()
    calls = coalescer(service)
    loop = asyncio.get_running_loop()
    members = [Pending(f"r{n}", loop.create_future(), loop.time() + 5, None) for n in range(2)]
    for member in members:
        member.future.cancel()
    calls._in_flight += 1  # as _send_next counts the call it starts
    await calls._send(members)
    assert not service.batch_calls and not service.single_calls and calls.in_flight == 0
    assert "failed unexpectedly" not in caplog.text


async def test_more_in_flight_calls_are_sent_before_any_request_waits() -> None:
    service = FakeService()
    calls = coalescer(service, max_in_flight=2)
    await occupy(service, calls)
    second = asyncio.ensure_future(calls("r1", timeout=5))
    await settle_loop()
    assert calls.in_flight == 2 and calls.queued == 0
    service.gate.set()
    assert await second == "answer to r1"


async def test_each_request_of_a_batch_gets_its_own_status() -> None:
    service = FakeService()
    service.statuses["r2"] = common_pb2.CallStatus(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="requests[1].k: must be in 1..10000, got 0"
    )
    calls = coalescer(service)
    first = await occupy(service, calls)
    waiting = await queue(calls, "r1", "r2", "r3")
    service.gate.set()
    await first
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert results[0] == "answer to r1" and results[2] == "answer to r3"
    assert isinstance(results[1], grpc.aio.AioRpcError)
    assert results[1].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert results[1].details() == "requests[1].k: must be in 1..10000, got 0"


@pytest.mark.parametrize("failure", ["call", "wrong_size"])
async def test_a_failed_batch_call_fails_each_of_its_requests(failure: str) -> None:
    service = FakeService()
    if failure == "call":
        service.batch_error = rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused")
    else:
        service.short_answer = True
    calls = coalescer(service)
    first = await occupy(service, calls)
    waiting = await queue(calls, "r1", "r2")
    service.gate.set()
    await first
    for result in await asyncio.gather(*waiting, return_exceptions=True):
        assert isinstance(result, grpc.aio.AioRpcError)
        expected = grpc.StatusCode.UNAVAILABLE if failure == "call" else grpc.StatusCode.INTERNAL
        assert result.code() == expected
    assert calls.in_flight == 0 and calls.queued == 0


async def test_a_request_ends_at_its_own_deadline_while_its_batch_is_still_out() -> None:
    service = FakeService()
    calls = coalescer(service)
    first = await occupy(service, calls)
    (short,) = await queue(calls, "short", timeout=0.3)
    (long,) = await queue(calls, "long")
    service.batch_gate = asyncio.Event()
    service.gate.set()  # r0 returns; the batch [short, long] goes out and stays out
    await first
    await settle_loop()
    assert [call.requests for call in service.batch_calls] == [["short", "long"]]
    short_budget, long_budget = service.batch_calls[0].budgets_ms
    assert short_budget <= 300 and 4000 < long_budget <= 5000
    assert 4 < service.batch_timeouts[0] <= 5  # the call lives as long as its longest request
    started = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await short
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert asyncio.get_running_loop().time() - started < 1.0  # not after the call's 5 s
    service.batch_gate.set()
    assert await long == "answer to long"


async def test_a_request_whose_deadline_passed_in_the_queue_is_never_sent() -> None:
    service = FakeService()
    calls = coalescer(service)
    first = await occupy(service, calls)
    expired = asyncio.ensure_future(calls("expired", timeout=0.05))
    await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await expired
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    service.gate.set()
    await first
    await settle_loop()
    assert not service.batch_calls and [r for r, _ in service.single_calls] == ["r0"]


async def test_a_cancelled_caller_is_left_out_of_the_next_call() -> None:
    service = FakeService()
    calls = coalescer(service)
    first = await occupy(service, calls)
    gone, kept = await queue(calls, "gone", "kept")
    gone.cancel()
    service.gate.set()
    await first
    assert await kept == "answer to kept"
    assert [r for r, _ in service.single_calls] == ["r0", "kept"]  # a batch of one is a plain call


async def test_a_service_without_the_batch_method_gets_plain_calls_from_then_on() -> None:
    service = FakeService()
    service.batch_error = rpc_error(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    calls = coalescer(service)
    first = await occupy(service, calls)
    waiting = await queue(calls, "r1", "r2")
    service.gate.set()
    await first
    assert await asyncio.gather(*waiting) == ["answer to r1", "answer to r2"]
    assert not calls.batch_supported
    service.gate = asyncio.Event()
    later = await queue(calls, "r3", "r4", "r5")
    assert calls.queued == 0  # none held back behind another call
    service.gate.set()
    assert await asyncio.gather(*later) == ["answer to r3", "answer to r4", "answer to r5"]
    assert len(service.batch_calls) == 1  # only the first attempt
    assert [r for r, _ in service.single_calls] == ["r0", "r1", "r2", "r3", "r4", "r5"]


async def test_max_batch_caps_the_requests_of_one_call() -> None:
    service, sizes = FakeService(), []
    calls = coalescer(service, sizes, max_batch=2)
    first = await occupy(service, calls)
    waiting = await queue(calls, *(f"r{n}" for n in range(1, 6)), timeout=5)
    service.gate.set()
    await first
    assert len(await asyncio.gather(*waiting)) == 5
    assert sizes == [1, 2, 2, 1]


def test_each_request_ends_at_its_budget_never_past_the_call() -> None:
    assert member_deadlines(2, [], 10.0, 0.0) == [10.0, 10.0]
    assert member_deadlines(3, [100.0, 0.0, 50_000.0], 10.0, 1.0) == [1.1, 1.0, 10.0]
    assert member_deadlines(1, [20.0], None, 1.0) == [1.02]
    for count, budgets, field in (
        (0, [], "requests"),
        (257, [], "requests"),
        (2, [1.0], "budgets_ms"),
        (1, [float("nan")], "budgets_ms[0]"),
    ):
        with pytest.raises(InvalidArgument) as error:
            member_deadlines(count, budgets, None, 0.0)
        assert error.value.field == field


async def test_callers_of_a_cancelled_batch_call_learn_it_at_once() -> None:
    service = FakeService()
    calls = coalescer(service)
    first = await occupy(service, calls)
    waiting = await queue(calls, "r1", "r2", timeout=30)
    service.batch_gate = asyncio.Event()
    service.gate.set()
    await first
    await settle_loop()
    assert len(service.batch_calls) == 1
    for task in list(calls._tasks):  # what a loop shutting down does to the call's task
        task.cancel()
    for result in await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 1):
        assert isinstance(result, grpc.aio.AioRpcError) and result.code() == grpc.StatusCode.CANCELLED
    assert calls.in_flight == 0


async def test_requests_held_past_max_hold_go_out_while_a_stalled_call_is_still_out() -> None:
    service, releases = FakeService(), []
    calls = coalescer(service, max_hold_s=0.05, on_release=lambda: releases.append(1))
    first = await occupy(service, calls)  # stalls until the gate opens
    service.batch_gate = asyncio.Event()
    service.batch_gate.set()  # batch calls answer at once
    waiting = await queue(calls, "r1", "r2")
    assert calls.queued == 2  # held behind the stalled call for now
    answers = await asyncio.wait_for(asyncio.gather(*waiting), timeout=3)
    assert answers == ["answer to r1", "answer to r2"] and not first.done()
    assert [call.requests for call in service.batch_calls] == [["r1", "r2"]] and releases == [1]
    # The next requests held behind the limit start the clock again (two: a lone one would go as a
    # plain call, which this fake stalls too).
    later = await queue(calls, "r3", "r4")
    assert calls.queued == 2
    assert await asyncio.wait_for(asyncio.gather(*later), timeout=3) == ["answer to r3", "answer to r4"]
    assert releases == [1, 1] and not first.done()
    service.gate.set()
    assert await first == "answer to r0"


async def test_a_call_that_returns_within_max_hold_takes_the_queue_without_a_release() -> None:
    service, releases = FakeService(), []
    calls = coalescer(service, max_hold_s=0.2, on_release=lambda: releases.append(1))
    first = await occupy(service, calls)
    waiting = await queue(calls, "r1", "r2")
    service.gate.set()
    await first
    assert await asyncio.gather(*waiting) == ["answer to r1", "answer to r2"]
    await asyncio.sleep(0.3)  # past the hold: its timer was cancelled with the queue emptied
    assert releases == [] and [call.requests for call in service.batch_calls] == [["r1", "r2"]]


@pytest.mark.parametrize("hold", [0.0, -1.0, float("nan")])
def test_max_hold_must_be_a_positive_time(hold: float) -> None:
    with pytest.raises(ValueError, match="max_hold_s must be > 0"):
        coalescer(FakeService(), max_hold_s=hold)
