"""Validation helpers, the grpc_method decorator's status mapping, JSON logs and bundle_info."""

from __future__ import annotations

import io
import json
import logging

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from recsys.serving.logging import configure_logging
from recsys.serving.metrics import GrpcServerMetrics, bundle_info
from recsys.serving.validation import (
    MAX_ECHO_CHARS,
    InvalidArgument,
    MalformedRequest,
    grpc_method,
    invalid_utf8_field,
    require,
    require_id,
    require_in_range,
    require_text,
    shorten,
    tolerant_deserializer,
)
from recsys.v1 import common_pb2, gateway_pb2


def test_invalid_argument_message_starts_with_the_field() -> None:
    error = InvalidArgument("filters.category", "unknown category 'x'")
    assert (error.field, error.reason) == ("filters.category", "unknown category 'x'")
    assert str(error) == "filters.category: unknown category 'x'"


def test_require() -> None:
    require(True, "scenario", "unknown")
    with pytest.raises(InvalidArgument) as caught:
        require(False, "scenario", "unknown")
    assert str(caught.value) == "scenario: unknown"


@pytest.mark.parametrize(("value", "accepted"), [(1, True), (10000, True), (0, False), (10001, False)])
def test_require_in_range_is_inclusive(value: int, accepted: bool) -> None:
    if accepted:
        require_in_range(value, "k", 1, 10000)
    else:
        with pytest.raises(InvalidArgument) as caught:
            require_in_range(value, "k", 1, 10000)
        assert str(caught.value) == f"k: must be in 1..10000, got {value}"


def test_require_in_range_rejects_nan() -> None:
    with pytest.raises(InvalidArgument) as caught:
        require_in_range(float("nan"), "weight", 0, 1)
    assert str(caught.value) == "weight: must be in 0..1, got NaN"


@pytest.mark.parametrize("value", ["sku-1", "B00012ABC", "user:42/a", "café"])
def test_require_id_accepts_printable_ids(value: str) -> None:
    require_id(value, "user_id")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "must not be empty"),
        ("a b", "must not contain whitespace"),
        ("a\tb", "must not contain whitespace"),
        ("a\x00b", "must not contain whitespace or control characters"),
        ("x" * 257, "must be at most 256 characters, got 257"),
    ],
)
def test_require_id_rejects(value: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        require_id(value, "history[3].item_id")
    assert str(caught.value).startswith(f"history[3].item_id: {reason}")


def test_require_id_allow_empty_and_max_length() -> None:
    require_id("", "user_id", allow_empty=True)
    with pytest.raises(InvalidArgument, match="at most 4 characters"):
        require_id("abcde", "request_id", max_length=4)


class RecordingContext:
    """Stands in for grpc.aio.ServicerContext: records the abort like the real one raises."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


async def test_grpc_method_maps_errors_to_status_codes() -> None:
    class Servicer:
        @grpc_method
        async def Recall(self, request: str, context: RecordingContext) -> str:
            if request == "bad":
                raise InvalidArgument("k", "must be in 1..10000, got 0")
            if request == "abort":
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such user")
            if request == "bug":
                raise KeyError("oops")
            return "ok"

    servicer = Servicer()
    assert servicer.Recall.__name__ == "Recall"
    outcomes = {}
    for request in ("bad", "abort", "bug"):
        context = RecordingContext()
        with pytest.raises(grpc.aio.AbortError):
            await servicer.Recall(request, context)
        outcomes[request] = context.aborted
    assert outcomes == {
        "bad": (grpc.StatusCode.INVALID_ARGUMENT, "k: must be in 1..10000, got 0"),
        "abort": (grpc.StatusCode.NOT_FOUND, "no such user"),
        "bug": (grpc.StatusCode.INTERNAL, "internal error"),
    }
    assert await servicer.Recall("fine", RecordingContext()) == "ok"


def test_grpc_method_needs_an_async_handler() -> None:
    with pytest.raises(TypeError, match="async def"):

        @grpc_method
        def Recall(request: object, context: object) -> None:
            pass


def test_json_logs_one_object_per_line_with_extras_and_traceback() -> None:
    stream = io.StringIO()
    handler = configure_logging("rank", "DEBUG", stream=stream)
    try:
        log = logging.getLogger("rank_service.runtime")
        log.info("batch scored", extra={"batch_size": 32, "model_version": "v3"})
        log.debug('quotes " and\nnewlines')
        try:
            raise ValueError("shape mismatch")
        except ValueError:
            log.exception("inference failed")
        assert configure_logging("rank", "INFO", stream=stream) is not handler  # replaces, not adds
        assert sum(getattr(h, "_recsys_json", False) for h in logging.getLogger().handlers) == 1
    finally:
        logging.getLogger().removeHandler(handler)

    lines = stream.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 3
    first, second, third = entries
    assert {key: first[key] for key in ("level", "service", "logger", "message")} == {
        "level": "INFO",
        "service": "rank",
        "logger": "rank_service.runtime",
        "message": "batch scored",
    }
    assert (first["batch_size"], first["model_version"]) == (32, "v3")
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert second["message"] == 'quotes " and\nnewlines'
    assert third["level"] == "ERROR" and "ValueError: shape mismatch" in third["exception"]


def test_bundle_info_keeps_one_version_per_service_and_kind() -> None:
    registry = CollectorRegistry()
    bundle_info(registry, "recall", "recall", "v1")
    bundle_info(registry, "recall", "recall", "v2")
    bundle_info(registry, "rank", "rank", "r1")
    series = {
        (labels["service"], labels["kind"], labels["version"]): value
        for metric in registry.collect()
        if metric.name == "recsys_bundle_info"
        for _, labels, value, *_ in metric.samples
    }
    assert series == {("recall", "recall", "v2"): 1.0, ("rank", "rank", "r1"): 1.0}


def test_server_metrics_can_share_a_registry() -> None:
    registry = CollectorRegistry()
    first, second = GrpcServerMetrics(registry), GrpcServerMetrics(registry)
    assert first.handled is second.handled
    first.started.labels("unary", "recsys.v1.RankService", "Rank").inc()
    assert b'grpc_server_started_total{grpc_method="Rank"' in generate_latest(registry)


def test_messages_echo_at_most_about_64_characters_of_a_value() -> None:
    assert shorten("home") == "'home'"
    long = shorten("x" * 20_000)
    assert len(long) < MAX_ECHO_CHARS + 30 and long.endswith("... (20000 characters)")
    with pytest.raises(InvalidArgument) as caught:
        require_id("\x00" * 200, "user_id")
    assert len(str(caught.value)) < 160


@pytest.mark.parametrize("value", ["", "Home & Kitchen", "Beauty", "café au lait"])
def test_require_text_accepts_names_with_spaces(value: str) -> None:
    require_text(value, "context.category")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("a\nb", "must not contain control characters, got 'a\\nb'"),
        ("\x07bell", "must not contain control characters"),
        ("c" * 257, "must be at most 256 characters, got 257"),
    ],
)
def test_require_text_rejects_control_characters_and_long_values(value: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        require_text(value, "context.category")
    assert str(caught.value).startswith(f"context.category: {reason}")


def _with_bad_utf8(message, good: bytes) -> bytes:
    """``message`` serialized with the UTF-8 bytes ``good`` replaced by invalid ones."""
    data = message.SerializeToString()
    assert data.count(good) == 1
    return data.replace(good, b"\xff" * len(good))


@pytest.mark.parametrize(
    ("message", "marker", "field"),
    [
        (gateway_pb2.RecommendRequest(scenario="SCEN"), b"SCEN", "scenario"),
        (
            gateway_pb2.RecommendRequest(context=gateway_pb2.RecommendContext(item_ids=["a", "b", "CTXI"])),
            b"CTXI",
            "context.item_ids[2]",
        ),
        (
            gateway_pb2.RecommendRequest(context=gateway_pb2.RecommendContext(category="CATG")),
            b"CATG",
            "context.category",
        ),
        (
            gateway_pb2.RecommendRequest(
                num_items=5,
                history=[
                    common_pb2.HistoryItem(item_id="ok", timestamp_ms=7),
                    common_pb2.HistoryItem(item_id="HIST"),
                ],
            ),
            b"HIST",
            "history[1].item_id",
        ),
        (
            gateway_pb2.LogEventsRequest(
                events=[gateway_pb2.Event(event_id="e1", user_id="u1"), gateway_pb2.Event(user_id="USER")]
            ),
            b"USER",
            "events[1].user_id",
        ),
    ],
)
def test_invalid_utf8_is_located_and_named(message, marker: bytes, field: str) -> None:
    data = _with_bad_utf8(message, marker)
    assert invalid_utf8_field(message.DESCRIPTOR, data) == field
    parsed = tolerant_deserializer(type(message).FromString)(data)
    assert parsed == MalformedRequest(field, "must be valid UTF-8")
    assert str(parsed) == f"{field}: must be valid UTF-8"


def test_bytes_that_are_not_protobuf_become_a_malformed_request() -> None:
    deserialize = tolerant_deserializer(gateway_pb2.RecommendRequest.FromString)
    request = gateway_pb2.RecommendRequest(scenario="home", num_items=3)
    assert deserialize(request.SerializeToString()) == request
    truncated = deserialize(request.SerializeToString()[:-1])  # the last varint cut off
    assert truncated == MalformedRequest(
        "request", "cannot be parsed as recsys.v1.RecommendRequest (7 bytes)"
    )
    garbage = deserialize(b"\xff\xff\xff")
    assert isinstance(garbage, MalformedRequest) and garbage.field == "request"
    assert invalid_utf8_field(gateway_pb2.RecommendRequest.DESCRIPTOR, b"\xff\xff\xff") is None


def test_a_deserializer_that_validates_names_its_field() -> None:
    def strict(_data: bytes) -> None:
        raise InvalidArgument("candidates", "not a whole number of int32 values")

    assert tolerant_deserializer(strict)(b"") == MalformedRequest(
        "candidates", "not a whole number of int32 values"
    )
