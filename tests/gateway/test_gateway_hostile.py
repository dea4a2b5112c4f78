"""Hostile input to the real gateway (the checks of issue 13): each gets INVALID_ARGUMENT naming
the field with a short message, never an echo of a 20 KB value, never UNKNOWN; invalid UTF-8 is
answered before the handler and counted in the gRPC metrics."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import generate_latest

from recsys.v1 import common_pb2, gateway_pb2
from tests.gateway.conftest import FakeStack, eventually

HUGE = "x" * 20_000
MAX_DETAILS = 300  # a short message: the field, the rule, at most ~64 characters of the value


async def invalid_argument(fake_stack: FakeStack, method: str, request) -> str:
    """The details of the INVALID_ARGUMENT the gateway must answer ``request`` with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(fake_stack.stub, method)(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    details = caught.value.details()
    assert len(details) < MAX_DETAILS, details
    return details


def recommend(**fields) -> gateway_pb2.RecommendRequest:
    return gateway_pb2.RecommendRequest(**{"user_id": "u1", "scenario": "home", "num_items": 5, **fields})


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (recommend(scenario=HUGE), "scenario: unknown scenario 'xxxx"),
        (recommend(scenario="bad\x00name"), "scenario: unknown scenario 'bad\\x00name'"),
        (recommend(user_id=HUGE), "user_id: must be at most 256 characters, got 20000"),
        (recommend(user_id="u\x07" * 100), "user_id: must not contain whitespace or control characters"),
        (recommend(request_id=HUGE), "request_id: must be at most 256 characters"),
        (
            recommend(scenario="category", context=gateway_pb2.RecommendContext(category=HUGE)),
            "context.category: must be at most 256 characters, got 20000",
        ),
        (
            recommend(context=gateway_pb2.RecommendContext(category="Shoes\r\nX-Injected: 1")),
            "context.category: must not contain control characters",
        ),
        (
            recommend(context=gateway_pb2.RecommendContext(item_ids=["ok", HUGE])),
            "context.item_ids[1]: must be at most 256 characters",
        ),
        (
            recommend(
                history=[
                    common_pb2.HistoryItem(item_id="i1"),
                    common_pb2.HistoryItem(item_id="i2", timestamp_ms=-5),
                ]
            ),
            "history[1].timestamp_ms: must be >= 0 (0 = unknown), got -5",
        ),
        (
            recommend(history=[common_pb2.HistoryItem(item_id="i1", type=99)]),
            "history[0].type: unknown event type 99",
        ),
    ],
)
async def test_bad_recommend_fields_are_named_with_a_short_message(
    fake_stack: FakeStack, request_, field: str
):
    details = await invalid_argument(fake_stack, "Recommend", request_)
    assert details.startswith(field), details


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (
            gateway_pb2.Event(event_id=HUGE, user_id="u", item_id="i", type=1),
            "events[0].event_id: must be at most",
        ),
        (
            gateway_pb2.Event(event_id="e", user_id="u", item_id="i", type=1, scenario=HUGE),
            "events[0].scenario",
        ),
        (
            gateway_pb2.Event(event_id="e", user_id="u\x00", item_id="i", type=1),
            "events[0].user_id: must not",
        ),
        (
            gateway_pb2.Event(event_id="e", user_id="u", item_id="i", type=1, timestamp_ms=-1),
            "events[0].timestamp_ms",
        ),
    ],
)
async def test_bad_event_fields_are_named_with_a_short_message(fake_stack: FakeStack, event, field: str):
    details = await invalid_argument(fake_stack, "LogEvents", gateway_pb2.LogEventsRequest(events=[event]))
    assert details.startswith(field), details


def _bad_utf8(message, marker: bytes) -> bytes:
    data = message.SerializeToString()
    assert data.count(marker) == 1
    return data.replace(marker, b"\xc3\x28" + marker[2:])  # 0xC3 0x28: an invalid 2-byte sequence


@pytest.mark.parametrize(
    ("method", "payload", "field"),
    [
        ("Recommend", _bad_utf8(recommend(scenario="MARK"), b"MARK"), "scenario"),
        ("Recommend", _bad_utf8(recommend(user_id="MARK"), b"MARK"), "user_id"),
        (
            "Recommend",
            _bad_utf8(recommend(context=gateway_pb2.RecommendContext(category="MARK")), b"MARK"),
            "context.category",
        ),
        (
            "Recommend",
            _bad_utf8(
                recommend(
                    history=[common_pb2.HistoryItem(item_id="a"), common_pb2.HistoryItem(item_id="MARK")]
                ),
                b"MARK",
            ),
            "history[1].item_id",
        ),
        (
            "LogEvents",
            _bad_utf8(
                gateway_pb2.LogEventsRequest(events=[gateway_pb2.Event(event_id="e", item_id="MARK")]),
                b"MARK",
            ),
            "events[0].item_id",
        ),
        ("ForgetUser", _bad_utf8(gateway_pb2.ForgetUserRequest(user_id="MARK"), b"MARK"), "user_id"),
    ],
)
async def test_invalid_utf8_is_invalid_argument_naming_the_field_and_counted(
    fake_stack: FakeStack, method: str, payload: bytes, field: str
):
    call = fake_stack.channel.unary_unary(f"/recsys.v1.Gateway/{method}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(payload, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == f"{field}: must be valid UTF-8"
    counted = f'grpc_server_handled_total{{grpc_code="INVALID_ARGUMENT",grpc_method="{method}"'
    # The server counts the call after its answer is on the wire: wait for it, do not race it.
    await eventually(lambda: counted in generate_latest(fake_stack.gateway.registry).decode())
    assert "UNKNOWN" not in generate_latest(fake_stack.gateway.registry).decode()


async def test_bytes_that_are_not_a_message_are_invalid_argument(fake_stack: FakeStack):
    call = fake_stack.channel.unary_unary("/recsys.v1.Gateway/Recommend")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)  # a length far beyond the message
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "request: cannot be parsed as recsys.v1.RecommendRequest (6 bytes)"
