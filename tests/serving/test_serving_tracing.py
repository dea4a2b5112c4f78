"""OpenTelemetry tracing: one trace per Recommend across real gateway, recall and rank servers,
a span per pipeline stage, no user ids in attributes, trace ids in log lines, and nothing
installed when no OTLP endpoint is configured."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.util._once import Once

from recsys.serving.logging import configure_logging
from recsys.serving.tracing import child_span, outgoing_metadata, setup_tracing
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.test_gateway_e2e import scenarios_with_offline_check
from tests.serving.conftest import ServeFactory
from tests.stack import running_stack

USER_ID = "trace-user-4242"


def _reset_global_tracer_provider() -> None:
    # OpenTelemetry lets a process install one provider; its own test utilities reset it like this.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def no_tracer_provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No provider installed and no OTEL endpoint in the environment; the same after the test."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    _reset_global_tracer_provider()
    yield
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()
    _reset_global_tracer_provider()


@pytest.fixture
def span_exporter(no_tracer_provider: None) -> InMemorySpanExporter:
    """Tracing on, through the servers' own setup function, into an in-memory exporter."""
    exporter = InMemorySpanExporter()
    assert setup_tracing("recsys-test", exporter=exporter) is not None
    return exporter


def server_spans(spans: list[ReadableSpan], service: str) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("rpc.service") == service]


@pytest.mark.integration
async def test_one_recommend_is_one_trace_across_gateway_recall_and_rank(
    span_exporter: InMemorySpanExporter, recall_bundle: Path, rank_bundle: Path, tmp_path: Path
):
    scenarios = scenarios_with_offline_check(tmp_path / "scenarios.yaml")  # budgets stretched for CI
    async with (
        running_stack(recall_bundle, rank_bundle, tmp_path, scenarios_path=scenarios) as stack,
        stack.gateway_channel() as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        span_exporter.clear()  # the start-up calls (catalog fetch) are traces of their own
        response = await stub.Recommend(
            gateway_pb2.RecommendRequest(request_id="traced-1", user_id=USER_ID, scenario="home", num_items=5)
        )
    assert len(response.items) == 5 and not response.degraded, response.degraded_reasons
    spans = list(span_exporter.get_finished_spans())

    (gateway,) = server_spans(spans, "recsys.v1.Gateway")
    (recall,) = server_spans(spans, "recsys.v1.RecallService")
    (rank,) = server_spans(spans, "recsys.v1.RankService")
    stages = {s.name: s for s in spans if s.name.startswith("stage ")}
    assert set(stages) == {"stage history", "stage recall", "stage rank", "stage rerank"}

    trace_id = gateway.context.trace_id
    assert gateway.parent is None  # the client sent no context: the gateway starts the trace
    assert {s.context.trace_id for s in [recall, rank, *stages.values()]} == {trace_id}
    # recall and rank continue the trace under the stage that called them
    assert recall.parent.span_id == stages["stage recall"].context.span_id
    assert rank.parent.span_id == stages["stage rank"].context.span_id
    assert all(s.parent.span_id == gateway.context.span_id for s in stages.values())
    assert gateway.attributes["rpc.grpc.status_code"] == 0

    for stage in ("recall", "rank", "rerank"):
        attributes = stages[f"stage {stage}"].attributes
        assert attributes["recsys.scenario"] == "home" and attributes["recsys.stage"] == stage
        assert attributes["recsys.candidates_out"] > 0
    assert stages["stage recall"].attributes["recsys.candidates_in"] == 0
    assert stages["stage rank"].attributes["recsys.candidates_in"] > 0

    for span in spans:
        for value in span.attributes.values():
            assert USER_ID not in str(value), f"{span.name} carries the user id"


@pytest.mark.usefixtures("no_tracer_provider")
async def test_without_an_otlp_endpoint_no_tracer_provider_is_installed(serve: ServeFactory):
    assert setup_tracing("recall") is None
    await serve()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    with child_span("stage recall", {"recsys.scenario": "home"}) as span:
        assert not span.is_recording()
        assert outgoing_metadata() is None


@pytest.mark.usefixtures("no_tracer_provider")
def test_an_otlp_endpoint_installs_a_provider_named_after_the_service(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    provider = setup_tracing("rank")
    assert isinstance(provider, TracerProvider) and trace.get_tracer_provider() is provider
    assert provider.resource.attributes["service.name"] == "rank"
    assert setup_tracing("gateway") is provider  # one per process: a second server keeps it


def test_log_lines_carry_the_trace_id_of_the_current_span(span_exporter: InMemorySpanExporter):
    stream = io.StringIO()
    handler = configure_logging("gateway", stream=stream)
    try:
        with trace.get_tracer("test").start_as_current_span("call") as span:
            logging.getLogger("test").warning("inside")
        logging.getLogger("test").warning("outside")
    finally:
        logging.getLogger().removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["trace_id"] == trace.format_trace_id(span.get_span_context().trace_id)
    assert inside["span_id"] == trace.format_span_id(span.get_span_context().span_id)
    assert "trace_id" not in outside
