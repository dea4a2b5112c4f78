"""Batch calls on the internal hops: several requests of one unary method in one gRPC round trip.

A gRPC call costs the same ~0.7 ms of CPU on each side whatever it carries (``python -m
recsys.app.grpc_floor``), so at load the gateway's hops to recall and rank are mostly transport.
:class:`CallCoalescer` (the caller's side) sends a request at once while fewer than
``max_in_flight`` calls are out, and otherwise queues it: when a call returns, everything queued
goes out as ONE batch call (``RecallBatch`` / ``RankBatch``), each request carrying its own
remaining budget. Nothing waits for companions at low load (a lone request is a plain call), and
the busier the hop, the bigger its batches and the cheaper each request: the same dispatch rule as
the services' own micro-batcher (:mod:`recsys.serving.batching`), which then gets the batch's
requests together too.

:func:`answer_batch` (the service's side) answers each request of a batch call exactly as a call of
its own would be answered, with its own status (an invalid request gets ``INVALID_ARGUMENT`` naming
``requests[i].<field>``); the call's own status is an error only for a malformed batch.

A batch call carries its first request's metadata (its trace context): the others' spans are
not linked to the recall or rank work done for them.

A stalled call must not hold the queue until every deadline: with ``max_hold_s`` set, requests
that have waited that long behind the calls out go out anyway, as one extra batch call past the
limit (a release, counted by ``on_release``); the next request that queues behind the limit
starts the clock again. Without it, queued requests wait for a call to return (or their deadline).

A service without the batch method (an older version during a rolling upgrade) answers
``UNIMPLEMENTED``: the coalescer then sends that batch's requests, and every later one, as plain
calls, and logs it once.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from recsys.serving.validation import (
    EXPECTED_ERRORS,
    MAX_DETAILS_CHARS,
    InvalidArgument,
    error_status,
    require,
    rpc_error,
)
from recsys.v1 import common_pb2

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")

MAX_BATCH_REQUESTS = 256  # requests in one batch call (the protos' documented limit)
OK = grpc.StatusCode.OK.value[0]
STATUS_BY_CODE = {status.value[0]: status for status in grpc.StatusCode}


# -- the service's side -------------------------------------------------------------------------
def member_deadlines(
    count: int, budgets_ms: Sequence[float], deadline: float | None, now: float
) -> list[float | None]:
    """Each request's deadline (``loop.time()`` instants): ``now`` + its budget, never past the
    call's ``deadline``; the call's deadline for all when no budgets are given. InvalidArgument
    for a malformed batch."""
    require(count > 0, "requests", "must hold at least one request")
    require(count <= MAX_BATCH_REQUESTS, "requests", f"at most {MAX_BATCH_REQUESTS}, got {count}")
    if not budgets_ms:
        return [deadline] * count
    require(
        len(budgets_ms) == count,
        "budgets_ms",
        f"must have one per request ({count}) or none, got {len(budgets_ms)}",
    )
    deadlines: list[float | None] = []
    for position, budget in enumerate(budgets_ms):
        require(math.isfinite(budget) and budget >= 0, f"budgets_ms[{position}]", "must be >= 0 ms")
        own = now + budget / 1000.0
        deadlines.append(own if deadline is None else min(own, deadline))
    return deadlines


async def answer_member(
    position: int,
    handle: Callable[[Request, float | None], Awaitable[Response]],
    request: Request,
    deadline: float | None,
) -> tuple[Response | None, common_pb2.CallStatus]:
    """``handle(request, deadline)``'s answer, or its error as this request's own status."""
    try:
        return await handle(request, deadline), common_pb2.CallStatus(code=OK)
    except EXPECTED_ERRORS as error:  # a bad field; a catalog mismatch, shed, expired while queued
        code, message = error_status(error)
        if isinstance(error, InvalidArgument):  # named within the batch
            message = f"requests[{position}].{message}"[:MAX_DETAILS_CHARS]
    except Exception:
        log.exception("unhandled error in a batch call's request", extra={"position": position})
        code, message = grpc.StatusCode.INTERNAL, "internal error"
    return None, common_pb2.CallStatus(code=code.value[0], message=message)


async def answer_batch(
    requests: Sequence[Request],
    budgets_ms: Sequence[float],
    deadline: float | None,
    handle: Callable[[Request, float | None], Awaitable[Response]],
    empty: Callable[[], Response],
) -> tuple[list[Response], list[common_pb2.CallStatus]]:
    """The responses (``empty()`` where a request failed) and statuses of a batch call's
    ``requests``, each answered by ``handle(request, its deadline)`` concurrently (so the
    service's micro-batcher receives them together). InvalidArgument for a malformed batch."""
    now = asyncio.get_running_loop().time()
    deadlines = member_deadlines(len(requests), budgets_ms, deadline, now)
    answers = await asyncio.gather(
        *(
            answer_member(position, handle, request, own)
            for position, (request, own) in enumerate(zip(requests, deadlines, strict=True))
        )
    )
    return [empty() if response is None else response for response, _ in answers], [
        status for _, status in answers
    ]


# -- the caller's side --------------------------------------------------------------------------
@dataclass
class Pending(Generic[Request, Response]):
    """A request waiting for (or inside) a call, and who waits for its answer."""

    request: Request
    future: asyncio.Future[Response]
    deadline: float | None  # loop.time() instant
    metadata: Any
    timer: asyncio.TimerHandle | None = None


class CallCoalescer(Generic[Request, Response]):
    """One unary method of a stub, called with at most ``max_in_flight`` calls out; the requests
    that arrive meanwhile go out together as one batch call when a call returns.

    ``single(request, timeout=, metadata=)`` is the plain method (a lone request uses it),
    ``batch(batch_request, timeout=, metadata=)`` the batch method, ``batch_request(requests,
    budgets_ms)`` builds its request; its response has ``responses`` and ``statuses`` (one per
    request). Awaiting a call gives the request's own response, or raises the
    ``grpc.aio.AioRpcError`` a plain call would have raised (DEADLINE_EXCEEDED at the request's
    own timeout, even while its batch is still out).

    ``max_hold_s`` (None: no bound): the longest a request waits behind ``max_in_flight`` calls
    before what is queued goes out past the limit (``on_release`` is called for each such call)."""

    def __init__(
        self,
        single: Callable[..., Awaitable[Response]],
        batch: Callable[..., Awaitable[Any]],
        batch_request: Callable[[list[Request], list[float]], Any],
        max_in_flight: int,
        max_batch: int = 64,
        service: str = "downstream",
        on_call: Callable[[int], None] | None = None,
        max_hold_s: float | None = None,
        on_release: Callable[[], None] | None = None,
    ):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if not 1 <= max_batch <= MAX_BATCH_REQUESTS:
            raise ValueError(f"max_batch must be in 1..{MAX_BATCH_REQUESTS}, got {max_batch}")
        if max_hold_s is not None and not (math.isfinite(max_hold_s) and max_hold_s > 0):
            raise ValueError(f"max_hold_s must be > 0 seconds or None, got {max_hold_s}")
        self._single, self._batch, self._batch_request = single, batch, batch_request
        self.max_in_flight, self.max_batch = max_in_flight, max_batch
        self.max_hold_s = max_hold_s
        self.service = service
        self._on_call = on_call  # called with each call's number of requests
        self._on_release = on_release  # called for each call sent past the limit (max_hold_s)
        self._queue: list[Pending[Request, Response]] = []
        self._in_flight = 0
        self._hold_timer: asyncio.TimerHandle | None = None
        self.batch_supported = True
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        """Calls out now."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Requests waiting for a call."""
        return len(self._queue)

    async def __call__(
        self, request: Request, timeout: float | None = None, metadata: Any = None
    ) -> Response:
        if not self.batch_supported:  # an older service: plain calls, none held back
            return await self._single(request, timeout=timeout, metadata=metadata)
        if self._in_flight < self.max_in_flight and not self._queue:
            # A free slot and nobody waiting: the plain call, in the caller's own task.
            self._in_flight += 1
            try:
                if self._on_call is not None:
                    self._on_call(1)
                return await self._single(request, timeout=timeout, metadata=metadata)
            finally:
                self._in_flight -= 1
                self._dispatch()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Response] = loop.create_future()
        pending = Pending(request, future, None if timeout is None else loop.time() + timeout, metadata)
        if pending.deadline is not None:
            pending.timer = loop.call_at(pending.deadline, self._expire, future)
        self._queue.append(pending)
        self._dispatch()
        if self._queue and self._hold_timer is None and self.max_hold_s is not None:
            self._hold_timer = loop.call_later(self.max_hold_s, self._release)
        try:
            return await future
        finally:
            if pending.timer is not None:
                pending.timer.cancel()

    def _expire(self, future: asyncio.Future[Response]) -> None:
        if not future.done():
            future.set_exception(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))

    def _dispatch(self) -> None:
        """Send what is queued while fewer than ``max_in_flight`` calls are out."""
        while self._queue and self._in_flight < self.max_in_flight:
            self._send_next()
        if not self._queue and self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None

    def _release(self) -> None:
        """``max_hold_s`` passed with requests still queued behind the calls out: send them
        anyway (a call per ``max_batch`` requests), past the limit."""
        self._hold_timer = None
        while self._queue:
            if self._send_next() and self._on_release is not None:
                self._on_release()

    def _send_next(self) -> bool:
        """Send the next ``max_batch`` queued requests that still wait; False if none did."""
        taken, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        live = [pending for pending in taken if not pending.future.done()]  # expired or cancelled
        if not live:
            return False
        self._in_flight += 1
        task = asyncio.ensure_future(self._send(live))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _send(self, members: list[Pending[Request, Response]]) -> None:
        # Requests may have expired or been cancelled since they were taken off the queue (a
        # client gone at shutdown): only the others go out, and no call at all if none is left.
        members = [member for member in members if not member.future.done()]
        try:
            if not members:
                return
            if self._on_call is not None:
                self._on_call(len(members))
            if len(members) == 1:
                await self._send_single(members[0])
            elif not self.batch_supported:
                await asyncio.gather(*(self._send_single(member) for member in members))
            else:
                await self._send_batch(members)
        except asyncio.CancelledError:  # shutdown: the callers learn it now, not at their deadline
            for member in members:
                settle(
                    member.future,
                    error=rpc_error(grpc.StatusCode.CANCELLED, f"{self.service} call cancelled"),
                )
            raise
        except Exception as error:  # never leave a caller waiting
            log.exception("%s batch call failed unexpectedly", self.service)
            for member in members:
                settle(member.future, error=error)
        finally:
            self._in_flight -= 1
            self._dispatch()

    async def _send_single(self, member: Pending[Request, Response]) -> None:
        timeout = remaining(member.deadline)
        if timeout is not None and timeout <= 0:
            settle(member.future, error=rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))
            return
        try:
            response = await self._single(member.request, timeout=timeout, metadata=member.metadata)
        except grpc.aio.AioRpcError as error:
            settle(member.future, error=error)
        else:
            settle(member.future, response)

    async def _send_batch(self, members: list[Pending[Request, Response]]) -> None:
        timeouts = [remaining(m.deadline) for m in members]
        # The call lasts as long as its longest-lived request (each still ends at its own deadline).
        call_timeout = None if any(t is None for t in timeouts) else max(timeouts)  # type: ignore[type-var]
        budgets = [] if call_timeout is None else [max(0.0, t) * 1000.0 for t in timeouts]  # type: ignore[operator]
        batch_request = self._batch_request([m.request for m in members], budgets)
        try:
            answer = await self._batch(batch_request, timeout=call_timeout, metadata=members[0].metadata)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning(
                    "%s has no batch method (an older version?): plain calls from now on", self.service
                )
                self.batch_supported = False
                await asyncio.gather(*(self._send_single(member) for member in members))
                return
            for member in members:
                settle(member.future, error=error)
            return
        if len(answer.statuses) != len(members) or len(answer.responses) != len(members):
            error = rpc_error(grpc.StatusCode.INTERNAL, f"{self.service} answered a batch of the wrong size")
            for member in members:
                settle(member.future, error=error)
            return
        for member, response, status in zip(members, answer.responses, answer.statuses, strict=True):
            if status.code == OK:
                settle(member.future, response)
            else:
                code = STATUS_BY_CODE.get(status.code, grpc.StatusCode.UNKNOWN)
                settle(member.future, error=rpc_error(code, status.message))


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (a ``loop.time()`` instant); None without one."""
    return None if deadline is None else deadline - asyncio.get_running_loop().time()


def settle(future: asyncio.Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Answer ``future`` unless it was already (expired, cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class CoalescedStub:
    """``stub`` with its unary ``method`` sent through a :class:`CallCoalescer` (batches as
    ``batch_method`` with ``batch_request_type(requests=, budgets_ms=)``); every other attribute
    is the stub's own."""

    def __init__(
        self,
        stub: Any,
        method: str,
        batch_method: str,
        batch_request_type: Callable[..., Any],
        max_in_flight: int,
        service: str,
        on_call: Callable[[int], None] | None = None,
        max_hold_s: float | None = None,
        on_release: Callable[[], None] | None = None,
    ):
        self._stub = stub
        self.coalescer: CallCoalescer[Any, Any] = CallCoalescer(
            getattr(stub, method),
            getattr(stub, batch_method),
            lambda requests, budgets: batch_request_type(requests=requests, budgets_ms=budgets),
            max_in_flight,
            service=service,
            on_call=on_call,
            max_hold_s=max_hold_s,
            on_release=on_release,
        )
        setattr(self, method, self.coalescer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)
