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
from recsys.serving.validation import InvalidArgument, grpc_method, require, require_id, require_in_range


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
