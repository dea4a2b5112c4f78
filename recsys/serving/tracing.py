"""OpenTelemetry tracing: one trace per request across gateway -> recall -> rank.

Off unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set:
then no tracer provider is installed, the SDK is not even imported, servers get no tracing
interceptor and the helpers below return at once (the API's no-op). When on, spans go over OTLP/gRPC
in batches; the exporter reads the other standard ``OTEL_EXPORTER_OTLP_*`` variables itself, and
``OTEL_SERVICE_NAME`` (default: the service) names the process.

Propagation is W3C trace context in gRPC metadata (``traceparent``/``tracestate``):
:class:`TracingInterceptor` continues the caller's trace in a SERVER span per call, and a client
passes :func:`outgoing_metadata` with its calls. Span attributes carry scenarios, stages and
counts, never user ids or other request contents.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from recsys.serving.metrics import _grpc_type, _split_method, _status_code_name

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter

INSTRUMENTATION_NAME = "recsys"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
# Server spans are errors for these codes only (OpenTelemetry's gRPC semantic conventions): the
# others (INVALID_ARGUMENT, NOT_FOUND, ...) are the caller's mistake, not the server's.
SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)


def tracing_enabled() -> bool:
    """Whether the environment asks for traces (an OTLP endpoint is set and the SDK not disabled)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(os.environ.get(name) for name in ENDPOINT_VARIABLES)


def setup_tracing(service: str, exporter: SpanExporter | None = None) -> trace.TracerProvider | None:
    """Install the process's tracer provider; returns it, or None when tracing is off.

    With ``exporter`` (a test's in-memory one) spans go to it synchronously; otherwise, when the
    environment asks for traces (:func:`tracing_enabled`), in batches to the OTLP/gRPC endpoint.
    Idempotent per process: a provider installed earlier (by another server in this process, or
    a test) is kept and returned.
    """
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return current
    if exporter is None and not tracing_enabled():
        return None
    # Imported here so a process with tracing off never loads the SDK.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service})
    )
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)  # the SDK flushes and shuts it down at exit
    return provider


@functools.lru_cache(maxsize=4)
def _tracer(provider: trace.TracerProvider) -> trace.Tracer:
    return provider.get_tracer(INSTRUMENTATION_NAME)


def child_span(name: str, attributes: dict[str, Any]) -> AbstractContextManager[trace.Span]:
    """A span under the current one while a traced call is served; the no-op span otherwise
    (tracing off, or an entry point that has no span), at the cost of one context lookup."""
    if not trace.get_current_span().is_recording():
        return nullcontext(trace.INVALID_SPAN)
    return _tracer(trace.get_tracer_provider()).start_as_current_span(name, attributes=attributes)


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current trace context as gRPC metadata for a downstream call; None outside a trace."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span per call named ``service/method``, continuing the trace context the caller
    sent in its metadata; status code as ``rpc.grpc.status_code``. Unary calls run with the span
    current (their log lines carry its trace id). ``untraced_services`` (health checks,
    reflection) get no span, so probes do not flood the collector."""

    def __init__(self, tracer: trace.Tracer, untraced_services: Collection[str] = ()) -> None:
        self._tracer = tracer
        self._untraced = frozenset(untraced_services)
        self._traced: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full_method = handler_call_details.method
        if handler is None or _split_method(full_method)[0] in self._untraced:
            return handler
        cached = self._traced.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        traced = self._wrap(handler, full_method)
        self._traced[full_method] = (handler, traced)
        return traced

    def _wrap(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        service, method = _split_method(full_method)
        name = f"{service}/{method}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
        grpc_type = _grpc_type(handler)
        field = {
            "unary": "unary_unary",
            "client_stream": "stream_unary",
            "server_stream": "unary_stream",
            "bidi_stream": "stream_stream",
        }[grpc_type]
        behavior = getattr(handler, field)
        if inspect.iscoroutinefunction(behavior):
            return handler._replace(**{field: self._wrap_call(behavior, name, attributes)})
        if inspect.isasyncgenfunction(behavior):
            return handler._replace(**{field: self._wrap_stream(behavior, name, attributes)})
        return handler  # a synchronous handler runs in gRPC's thread pool; left untraced

    def _start(self, name: str, attributes: dict[str, str], context: grpc.aio.ServicerContext) -> trace.Span:
        parent = propagate.extract(dict(context.invocation_metadata() or ()))
        return self._tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    @staticmethod
    def _finish(span: trace.Span, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        code = _status_code_name(context, error)
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
        if code in SERVER_ERROR_CODES:
            span.set_status(Status(StatusCode.ERROR, code))  # no details: they may echo the request
        span.end()

    def _wrap_call(
        self, behavior: Callable[..., Any], name: str, attributes: dict[str, str]
    ) -> Callable[..., Any]:
        async def traced(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            span = self._start(name, attributes, context)
            error: BaseException | None = None
            try:
                with trace.use_span(
                    span, end_on_exit=False, record_exception=False, set_status_on_exception=False
                ):
                    return await behavior(request_or_iterator, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._finish(span, context, error)

        return traced

    def _wrap_stream(
        self, behavior: Callable[..., Any], name: str, attributes: dict[str, str]
    ) -> Callable[..., Any]:
        # The span is not made current: a generator may be finalised in another context, where
        # detaching it would fail.
        async def traced(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            span = self._start(name, attributes, context)
            error: BaseException | None = None
            try:
                async for response in behavior(request_or_iterator, context):
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._finish(span, context, error)

        return traced


def tracing_interceptor(service: str, untraced_services: Collection[str]) -> TracingInterceptor | None:
    """The server interceptor for ``service`` when tracing is on (:func:`setup_tracing`), else None."""
    provider = setup_tracing(service)
    if provider is None:
        return None
    return TracingInterceptor(_tracer(provider), untraced_services)
