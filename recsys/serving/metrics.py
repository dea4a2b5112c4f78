"""Prometheus metrics for every service: gRPC RED metrics (an aio server interceptor with the usual
``grpc_server_*`` names), the bundle info metric, and the HTTP ``/metrics`` endpoint.

Registries are passed in, never global, so each server (and each test) has its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import selectors
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.registry import Collector

from recsys.serving.thread_names import name_os_thread

# About 0.25 ms to 1 s (the default buckets hide sub-millisecond work), plus a tail for slow calls;
# dense from 75 ms to 400 ms, where the stage timeouts (120, 150 ms), the 300 ms scenario budget and
# the alerts' thresholds are (deploy/prometheus/alerts.yaml: p99 > 150 ms, latency SLO 300 ms), so a
# quantile or an SLO ratio read there is not interpolated across a 100-250 ms gap.
LATENCY_BUCKETS = (
    *(0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05),
    *(0.075, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5),
    *(1.0, 2.5, 5.0),
)

_REGISTRY_LOCK = threading.Lock()


def new_registry(process_metrics: bool = True) -> CollectorRegistry:
    """A fresh registry, with the process/platform/GC collectors a scrape normally expects."""
    registry = CollectorRegistry()
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def get_or_create(registry: CollectorRegistry, name: str, factory: Callable[[], Collector]) -> Any:
    """The collector already registered under ``name`` in ``registry``, else ``factory()``.

    Lets two servers (or a reload) share one registry without 'Duplicated timeseries' errors.
    """
    with _REGISTRY_LOCK:
        existing = registry._names_to_collectors.get(name)  # no public lookup in prometheus_client
        if existing is not None:
            return existing
        return factory()


class CachedLabels:
    """A labelled metric whose children are resolved once per label values (``labels()`` in
    prometheus_client validates and locks on every call: tens of microseconds per request on the
    serving paths). Only for label values from a bounded set (scenario, stage, reason names)."""

    def __init__(self, metric: Any):
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        """The child for ``values`` (positional, in the metric's label order)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


def bundle_info(registry: CollectorRegistry, service: str, kind: str, version: str) -> None:
    """Set the info metric ``recsys_bundle_info{service,kind,version} = 1``.

    A new version for the same (service, kind) replaces the old one, so a reload leaves one series.
    """
    gauge: Gauge = get_or_create(
        registry,
        "recsys_bundle_info",
        lambda: Gauge(
            "recsys_bundle_info",
            "Loaded bundle (value is always 1)",
            ["service", "kind", "version"],
            registry=registry,
        ),
    )
    with _REGISTRY_LOCK:
        for family in gauge.collect():
            for sample in family.samples:
                labels = sample.labels
                if labels["service"] == service and labels["kind"] == kind and labels["version"] != version:
                    gauge.remove(service, kind, labels["version"])
        gauge.labels(service=service, kind=kind, version=version).set(1)


class GrpcServerMetrics:
    """The gRPC server RED metrics, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started: Counter = get_or_create(
            registry,
            "grpc_server_started",
            lambda: Counter("grpc_server_started", "RPCs started on the server", labels, registry=registry),
        )
        self.handled: Counter = get_or_create(
            registry,
            "grpc_server_handled",
            lambda: Counter(
                "grpc_server_handled",
                "RPCs completed on the server, by status code",
                [*labels, "grpc_code"],
                registry=registry,
            ),
        )
        self.handling_seconds: Histogram = get_or_create(
            registry,
            "grpc_server_handling_seconds",
            lambda: Histogram(
                "grpc_server_handling_seconds",
                "Time from receiving an RPC to its status, in seconds",
                labels,
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
        )


def _split_method(full_method: str) -> tuple[str, str]:
    """'/recsys.v1.RecallService/Recall' -> ('recsys.v1.RecallService', 'Recall')."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


def _status_code_name(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status the client will see: the code the handler set or aborted with, else what gRPC
    sends for the way the handler ended."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"  # what grpc.aio sends for an unhandled exception


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts started/handled RPCs and observes handling time, labelled by type, service, method
    and (for handled) the real status code, including codes from ``context.abort``."""

    def __init__(self, metrics: GrpcServerMetrics) -> None:
        self._metrics = metrics
        # Per method: the handler last seen and its instrumented version. Handlers are static per
        # method unless an inner interceptor builds one per call, so this usually skips re-wrapping.
        self._instrumented: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        cached = self._instrumented.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        instrumented = self._instrument(handler, handler_call_details.method)
        self._instrumented[handler_call_details.method] = (handler, instrumented)
        return instrumented

    def _instrument(self, handler: grpc.RpcMethodHandler, full_method: str) -> grpc.RpcMethodHandler:
        service, method = _split_method(full_method)
        grpc_type = _grpc_type(handler)
        labels = (grpc_type, service, method)
        if grpc_type == "unary":
            return handler._replace(unary_unary=self._wrap_call(handler.unary_unary, labels))
        if grpc_type == "client_stream":
            return handler._replace(stream_unary=self._wrap_call(handler.stream_unary, labels))
        if grpc_type == "server_stream":
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, labels))
        return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, labels))

    def _recorder(self, labels: tuple[str, str, str]) -> Callable[[str, float], None]:
        """Records one finished call of the method ``labels`` names; label children resolved once."""
        handled: dict[str, Any] = {}
        seconds = self._metrics.handling_seconds.labels(*labels)

        def record(code: str, started_at: float) -> None:
            counter = handled.get(code)
            if counter is None:
                counter = handled[code] = self._metrics.handled.labels(*labels, code)
            counter.inc()
            seconds.observe(time.perf_counter() - started_at)

        return record

    def _wrap_call(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        if not inspect.iscoroutinefunction(behavior):
            return behavior  # a synchronous handler runs in gRPC's thread pool; left uninstrumented
        started = self._metrics.started.labels(*labels)
        record = self._recorder(labels)

        async def instrumented(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            started.inc()
            started_at = time.perf_counter()
            error: BaseException | None = None
            try:
                return await behavior(request_or_iterator, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                record(_status_code_name(context, error), started_at)

        return instrumented

    def _wrap_stream(self, behavior: Callable[..., Any], labels: tuple[str, str, str]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            # a coroutine that writes with context.write() has the same shape as a unary handler
            return self._wrap_call(behavior, labels)

        started = self._metrics.started.labels(*labels)
        record = self._recorder(labels)

        async def instrumented(
            request_or_iterator: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            started.inc()
            started_at = time.perf_counter()
            error: BaseException | None = None
            try:
                async for response in behavior(request_or_iterator, context):
                    yield response
            except BaseException as exc:
                error = exc
                raise
            finally:
                record(_status_code_name(context, error), started_at)

        return instrumented


class _ThreadingWsgiServer(ThreadingMixIn, WSGIServer):
    """A WSGI server whose loop sleeps in ``select`` until a connection or :meth:`stop` arrives.

    ``serve_forever`` polls (it wakes every ``poll_interval`` to look for a shutdown request): at
    the 50 ms needed for a prompt close that cost ~2 ms of CPU a second per idle process.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # first: a failed bind in super().__init__ calls server_close(), which closes these
        self._wake_reader, self._wake_writer = socket.socketpair()
        super().__init__(*args, **kwargs)

    def serve_until_stopped(self) -> None:
        """Accept and dispatch connections until :meth:`stop`; no timeouts, no polling."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_reader in ready:
                    return
                if self in ready:
                    self._handle_request_noblock()

    def stop(self) -> None:
        """Make :meth:`serve_until_stopped` return (now, or at once if it starts later)."""
        with contextlib.suppress(OSError):  # already closed: nothing left to wake
            self._wake_writer.send(b"x")

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()


class _IPv6ThreadingWsgiServer(_ThreadingWsgiServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: not news
        pass


class MetricsHttpServer:
    """``/metrics`` (Prometheus text or OpenMetrics, by Accept header) over HTTP in a daemon
    thread, serving one registry."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry) -> None:
        server_class = _IPv6ThreadingWsgiServer if ":" in host else _ThreadingWsgiServer
        self._httpd = make_server(
            host.strip("[]"), port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(target=self._serve, name=f"metrics-http-{self.port}", daemon=True)
        self._thread.start()
        self._closed = False

    def _serve(self) -> None:
        name_os_thread("metrics-http")
        self._httpd.serve_until_stopped()

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._httpd.stop()
        self._thread.join(timeout=5)
        self._httpd.server_close()
