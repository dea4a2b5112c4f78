"""The gateway's HTTP/JSON API and web console, served by the gateway process beside gRPC.

Bodies are the gRPC messages in their canonical proto3 JSON mapping (``google.protobuf.json_format``:
lowerCamelCase names, int64 as strings, enums by name). Every call goes through the same
:class:`~gateway.servicer.GatewayServicer` method as its gRPC twin, with an
:class:`HttpCallContext` standing in for the gRPC context: validation, load shedding, deadlines and
metrics are one code path; authentication uses the gRPC interceptor's own checks. A gRPC status
becomes an HTTP status (:data:`HTTP_STATUS`) and a body ``{"error": {"code": "INVALID_ARGUMENT",
"message": "num_items: must be in 0..500, got -1"}}``.

Deadlines: an ``X-Timeout-Ms`` header plays the role of the gRPC deadline (the call is answered
504 DEADLINE_EXCEEDED when it runs out); without it the servicer's default deadline applies, as for
a gRPC call without one. The OpenAPI document (``/openapi.json``) is generated from the proto
descriptors, so the contract is still written once, in ``protos/``.

Served with uvicorn in the gateway's event loop (:class:`HttpServer`), stopped with the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc
import uvicorn
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.servicer import GatewayServicer
from recsys.scenario.spec import MAX_NUM_ITEMS
from recsys.serving.auth import BearerAuthInterceptor, Unauthorized
from recsys.serving.metrics import LATENCY_BUCKETS, get_or_create
from recsys.serving.validation import MAX_DETAILS_CHARS, MAX_ECHO_CHARS, InvalidArgument, shorten
from recsys.v1 import gateway_pb2

CONSOLE_DIR = Path(__file__).resolve().parent / "console"  # package data (pyproject.toml)
TIMEOUT_HEADER = "X-Timeout-Ms"
MAX_ITEM_LOOKUP = 500  # ids per GET /v1/items
MIN_SHUTDOWN_WAIT_S = 0.05
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name

# gRPC status -> HTTP status (what the gateway's methods can answer; anything else is 500).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
# HTTP status -> the code named in the error body, for answers that did not come from a method.
_CODE_OF_STATUS = {status: code.name for code, status in HTTP_STATUS.items()} | {
    405: "UNIMPLEMENTED",
    413: "RESOURCE_EXHAUSTED",
}


@dataclass(frozen=True)
class JsonRoute:
    """One proto-bodied endpoint: the gRPC method behind it and its request/response messages."""

    path: str
    method: str  # the servicer method (and gRPC method) name
    request: type[Message]
    response: type[Message]
    summary: str

    @property
    def grpc_method(self) -> str:
        return f"/{GATEWAY_SERVICE}/{self.method}"


JSON_ROUTES = (
    JsonRoute(
        "/v1/recommend",
        "Recommend",
        gateway_pb2.RecommendRequest,
        gateway_pb2.RecommendResponse,
        "Recommend items for a scenario (scope recommend; debug=true also needs debug)",
    ),
    JsonRoute(
        "/v1/events",
        "LogEvents",
        gateway_pb2.LogEventsRequest,
        gateway_pb2.LogEventsResponse,
        "Log user events, idempotent by eventId (scope events)",
    ),
    JsonRoute(
        "/v1/forget-user",
        "ForgetUser",
        gateway_pb2.ForgetUserRequest,
        gateway_pb2.ForgetUserResponse,
        "Delete a user's history and dedupe records; excluded from the next training export (scope admin)",
    ),
    JsonRoute(
        "/v1/user-profile",
        "GetUserProfile",
        gateway_pb2.GetUserProfileRequest,
        gateway_pb2.GetUserProfileResponse,
        "A user's top categories and brands (recency-weighted) and the attribute clusters nearest "
        "their embedding (scope recommend)",
    ),
)


class CallAborted(grpc.aio.AbortError):
    """What :meth:`HttpCallContext.abort` raises: the call ends with ``code`` and ``details``.
    An ``AbortError``, so the servicer's error handling lets it through as it does gRPC's own."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class HttpCallContext:
    """The part of ``grpc.aio.ServicerContext`` the gateway's servicer uses, for an HTTP call."""

    def __init__(self, deadline: float | None, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._deadline = deadline  # time.monotonic() at which the caller gives up; None: no deadline
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request's headers (lower-case names), as gRPC metadata."""
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> NoReturn:
        raise CallAborted(code, details)


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def aborted_response(error: CallAborted) -> Response:
    status = HTTP_STATUS.get(error.code, 500)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return error_response(status, error.code.name, error.details, headers)


def message_json(message: Message) -> Response:
    """``message`` in canonical proto3 JSON, every field present (defaults too)."""
    return JSONResponse(
        json_format.MessageToDict(message, always_print_fields_with_no_presence=True),
    )


# -- request parsing ------------------------------------------------------------------------------

_FAILED_FIELD = re.compile(r"Failed to parse (\w+) field: ")
_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')
_AT_PATH = re.compile(r" at \w+\.([\w.\[\]]+?)\.*$")  # "... at RecommendRequest.history[0].type."


def parse_message(body: bytes, message_type: type[Message]) -> Message:
    """Parse canonical proto3 JSON; InvalidArgument naming the field (proto name, as gRPC's
    messages do) when the body is not valid JSON or a value does not fit its field. Unknown
    fields are rejected, so a misspelt name is an error rather than a silently missing value."""
    try:
        document = json.loads(body) if body.strip() else {}
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidArgument("request", f"not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise InvalidArgument("request", f"must be a JSON object, got {type(document).__name__}")
    message = message_type()
    try:
        json_format.ParseDict(document, message)
    except json_format.ParseError as error:
        text = str(error)
        names = _FAILED_FIELD.findall(text)
        unknown = _UNKNOWN_FIELD.search(text)
        if unknown is not None:
            path = _proto_path(message_type.DESCRIPTOR, names)
            field = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
            raise InvalidArgument(field[:MAX_ECHO_CHARS], "unknown field") from None
        at = _AT_PATH.search(text)
        if at is not None:  # the full path, with indices
            names = at.group(1).split(".")
        reason = _FAILED_FIELD.sub("", text).split(" at ", 1)[0].rstrip(".")
        raise InvalidArgument(_proto_path(message_type.DESCRIPTOR, names) or "request", reason) from None
    return message


def _proto_path(descriptor: Descriptor | None, json_names: list[str]) -> str:
    """``["context", "itemIds"]`` -> ``context.item_ids`` (the names as the proto spells them);
    an index stays (``history[0]``)."""
    parts = []
    for segment in json_names:
        name, bracket, index = segment.partition("[")
        field = None
        if descriptor is not None:
            field = next((f for f in descriptor.fields if name in (f.json_name, f.name)), None)
        parts.append((field.name if field is not None else name) + bracket + index)
        descriptor = field.message_type if field is not None else None
    return ".".join(parts)


def request_deadline(request: Request) -> float | None:
    """Seconds the caller allows (``X-Timeout-Ms``), None without the header."""
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        milliseconds = float(raw)
    except ValueError:
        milliseconds = math.nan
    if not (milliseconds > 0 and math.isfinite(milliseconds)):
        raise InvalidArgument(
            TIMEOUT_HEADER, f"must be a positive number of milliseconds, got {shorten(raw)}"
        )
    return milliseconds / 1000


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body; 413 RESOURCE_EXHAUSTED beyond ``max_bytes`` (the gRPC port's message limit)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"request body larger than {max_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise HTTPException(413, f"request body larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# -- metrics --------------------------------------------------------------------------------------


class HttpMetrics:
    """``recsys_http_requests_total{method,route,code}`` and ``recsys_http_request_seconds{route}``.

    Recommend and LogEvents calls are also in the servicer's own metrics (``recsys_requests_total``,
    stage histograms, events ingested), whichever port they came in on."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests: Counter = get_or_create(
            registry,
            "recsys_http_requests",
            lambda: Counter(
                "recsys_http_requests",
                "HTTP API requests, by method, route and status code",
                ["method", "route", "code"],
                registry=registry,
            ),
        )
        self.seconds: Histogram = get_or_create(
            registry,
            "recsys_http_request_seconds",
            lambda: Histogram(
                "recsys_http_request_seconds",
                "Time from receiving an HTTP API request to its response, seconds",
                ["route"],
                buckets=LATENCY_BUCKETS,
                registry=registry,
            ),
        )


class MetricsMiddleware:
    """Counts every HTTP request; routes outside ``known`` share the label ``other`` (bounded)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, known: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known = known

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.known else "/console/*" if path.startswith("/console/") else "other"
        status = 500

        async def send_counting(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.seconds.labels(route).observe(time.perf_counter() - started)


# -- the application ------------------------------------------------------------------------------


@dataclass
class HttpApi:
    """The endpoints, bound to one gateway's servicer, scenarios, auth and health."""

    servicer: GatewayServicer
    auth: BearerAuthInterceptor | None  # None: the gateway serves without authentication
    health: Any  # grpc_health.v1.health.aio.HealthServicer
    max_body_bytes: int
    metrics_port: int

    def authorize(self, request: Request, grpc_method: str) -> Any:
        """The caller's token entry (None without authentication); raises CallAborted."""
        if self.auth is None:
            return None
        header = request.headers.get("authorization")
        metadata = [("authorization", header)] if header is not None else []
        try:
            return self.auth.check(grpc_method, metadata)
        except Unauthorized as refusal:
            raise CallAborted(refusal.code, refusal.details) from None

    def json_endpoint(self, route: JsonRoute) -> Callable[[Request], Awaitable[Response]]:
        handler = getattr(self.servicer, route.method)

        async def endpoint(request: Request) -> Response:
            try:
                entry = self.authorize(request, route.grpc_method)  # before the body, as on gRPC
                timeout_s = request_deadline(request)
                deadline = None if timeout_s is None else time.monotonic() + timeout_s
                message = parse_message(await read_body(request, self.max_body_bytes), route.request)
                if self.auth is not None:
                    try:
                        self.auth.check_request(route.grpc_method, message, entry)
                    except Unauthorized as refusal:
                        raise CallAborted(refusal.code, refusal.details) from None
                metadata = tuple(request.headers.items())  # names already lower-case
                context = HttpCallContext(deadline, metadata)
                remaining = context.time_remaining()
                call = handler(message, context)
                try:
                    response = await (call if remaining is None else asyncio.wait_for(call, remaining))
                except TimeoutError:
                    raise CallAborted(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
            except InvalidArgument as error:
                return error_response(400, "INVALID_ARGUMENT", str(error)[:MAX_DETAILS_CHARS])
            except CallAborted as error:
                return aborted_response(error)
            return message_json(response)

        return endpoint

    async def list_scenarios(self, request: Request) -> Response:
        """GET /v1/scenarios: the configured scenarios, their required fields and defaults."""
        try:
            self.authorize(request, f"/{GATEWAY_SERVICE}/Recommend")
        except CallAborted as error:
            return aborted_response(error)
        current = self.servicer.scenarios()
        return JSONResponse(
            {
                "scenarios": [
                    {
                        "name": scenario.name,
                        "requiredFields": sorted(_json_path(f) for f in scenario.required_fields),
                        "defaultNumItems": scenario.default_num_items,
                        "maxNumItems": MAX_NUM_ITEMS,
                        "personalised": scenario.personalised,
                        "timeoutMs": scenario.timeout_ms,
                        "stages": [stage.kind for stage in scenario.stages],
                    }
                    for scenario in current.scenarios.values()
                ],
                "configDigest": current.digest,
            }
        )

    async def describe_items(self, request: Request) -> Response:
        """GET /v1/items?ids=a,b: category and brand of catalog items (for the console)."""
        try:
            self.authorize(request, f"/{GATEWAY_SERVICE}/Recommend")
            ids = [i for i in request.query_params.get("ids", "").split(",") if i]
            if len(ids) > MAX_ITEM_LOOKUP:
                raise InvalidArgument("ids", f"at most {MAX_ITEM_LOOKUP} ids, got {len(ids)}")
        except CallAborted as error:
            return aborted_response(error)
        except InvalidArgument as error:
            return error_response(400, "INVALID_ARGUMENT", str(error))
        catalog = self.servicer.pipeline.catalog
        if catalog is None:
            return error_response(503, "UNAVAILABLE", "no catalog yet (recall unreachable)")
        items = []
        for item_id, index in zip(ids, catalog.indices(ids).tolist(), strict=True):
            if index < 0:
                items.append({"itemId": item_id, "known": False})
                continue
            category, brand = int(catalog.item_category[index]), int(catalog.item_brand[index])
            items.append(
                {
                    "itemId": item_id,
                    "known": True,
                    "category": catalog.category_names[category] if category >= 0 else "",
                    "brand": catalog.brand_names[brand] if brand >= 0 else "",
                }
            )
        return JSONResponse({"items": items, "catalogVersion": catalog.version})

    async def healthz(self, _request: Request) -> Response:
        """The process is up and its event loop answers."""
        return JSONResponse({"status": "ok"})

    async def readyz(self, _request: Request) -> Response:
        """Ready when the gRPC health service says SERVING (warmed up, not shutting down)."""
        try:
            answer = await self.health.Check(health_pb2.HealthCheckRequest(service=""), HttpCallContext(None))
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except CallAborted:
            status = "SERVICE_UNKNOWN"
        return JSONResponse({"status": status}, status_code=200 if status == "SERVING" else 503)

    async def openapi(self, _request: Request) -> Response:
        return JSONResponse(openapi_document())

    async def console(self, _request: Request) -> Response:
        return FileResponse(CONSOLE_DIR / "index.html", headers=CONSOLE_HEADERS)

    async def console_config(self, _request: Request) -> Response:
        """What the console cannot know from its own URL: where /metrics is served."""
        return JSONResponse({"metricsPort": self.metrics_port})

    def app(self, registry: CollectorRegistry) -> ASGIApp:
        routes = [Route(r.path, self.json_endpoint(r), methods=["POST"]) for r in JSON_ROUTES]
        routes += [
            Route("/v1/scenarios", self.list_scenarios, methods=["GET"]),
            Route("/v1/items", self.describe_items, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
            Route("/console", self.console, methods=["GET"]),
            Route("/console/config.json", self.console_config, methods=["GET"]),
            Mount("/console", ConsoleFiles(directory=CONSOLE_DIR)),
        ]
        known = frozenset(r.path for r in routes if isinstance(r, Route))
        app = Starlette(
            routes=routes,
            exception_handlers={HTTPException: _http_error, Exception: _internal_error},
        )
        return MetricsMiddleware(app, HttpMetrics(registry), known)


# The console's scripts and styles are its own files: no inline code, nothing from elsewhere.
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


class ConsoleFiles(StaticFiles):
    """The console's static assets, with :data:`CONSOLE_HEADERS`."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(CONSOLE_HEADERS)
        return response


async def _http_error(_request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    code = _CODE_OF_STATUS.get(error.status_code, "UNKNOWN")
    return error_response(error.status_code, code, str(error.detail), dict(error.headers or {}))


async def _internal_error(_request: Request, _error: Exception) -> Response:
    # the servicer answers its own failures (INTERNAL); this is the adapter's, logged by uvicorn
    return error_response(500, "INTERNAL", "internal error")


def _json_path(proto_path: str) -> str:
    """``context.item_ids`` -> ``context.itemIds`` (the JSON names a client writes)."""
    return ".".join(re.sub(r"_(\w)", lambda m: m.group(1).upper(), part) for part in proto_path.split("."))


# -- OpenAPI, generated from the proto descriptors -------------------------------------------------

_SCALAR_SCHEMAS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number", "format": "float"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number", "format": "double"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "format": "int32", "minimum": 0},
    # canonical proto3 JSON writes 64-bit integers as strings and reads strings or numbers
    FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"], "format": "int64"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "format": "byte"},
}


def _message_schemas(descriptor: Descriptor, schemas: dict[str, Any]) -> None:
    """Add the JSON schema of ``descriptor`` (and of every message and enum it uses) to ``schemas``."""
    if descriptor.name in schemas:
        return
    properties: dict[str, Any] = {}
    schemas[descriptor.name] = {"type": "object", "properties": properties, "additionalProperties": False}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            _message_schemas(field.message_type, schemas)
            schema: dict[str, Any] = {"$ref": f"#/components/schemas/{field.message_type.name}"}
        elif field.type == FieldDescriptor.TYPE_ENUM:
            enum = field.enum_type
            schemas.setdefault(enum.name, {"type": "string", "enum": [value.name for value in enum.values]})
            schema = {"$ref": f"#/components/schemas/{enum.name}"}
        else:
            schema = dict(_SCALAR_SCHEMAS.get(field.type, {}))
        properties[field.json_name] = {"type": "array", "items": schema} if field.is_repeated else schema


def _error_schema() -> dict[str, Any]:
    codes = sorted({code.name for code in HTTP_STATUS} | set(_CODE_OF_STATUS.values()) | {"UNKNOWN"})
    return {
        "type": "object",
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "enum": codes},
                    "message": {"type": "string", "description": "starts with the field for a bad input"},
                },
                "required": ["code", "message"],
            }
        },
        "required": ["error"],
    }


def _errors(*statuses: int) -> dict[str, Any]:
    described = {
        400: "a field is invalid (the message names it)",
        401: "no or an unknown bearer token",
        403: "the token lacks the scope",
        413: "body larger than the gateway's message limit",
        429: "the gateway is overloaded (shed)",
        503: "no downstream and no fallback, or the history store is down",
        504: f"the {TIMEOUT_HEADER} deadline ran out",
    }
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    return {str(s): {"description": described[s], "content": error} for s in statuses}


@functools.cache
def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the HTTP API (built once; the protos do not change)."""
    schemas: dict[str, Any] = {"Error": _error_schema()}
    paths: dict[str, Any] = {}
    timeout = {
        "name": TIMEOUT_HEADER,
        "in": "header",
        "required": False,
        "description": "deadline in milliseconds (the gRPC deadline); default: the gateway's",
        "schema": {"type": "number", "exclusiveMinimum": 0},
    }
    for route in JSON_ROUTES:
        _message_schemas(route.request.DESCRIPTOR, schemas)
        _message_schemas(route.response.DESCRIPTOR, schemas)
        paths[route.path] = {
            "post": {
                "operationId": route.method,
                "summary": route.summary,
                "description": f"The gRPC method {GATEWAY_SERVICE}/{route.method}; bodies in canonical "
                "proto3 JSON.",
                "security": [{"bearer": []}],
                "parameters": [timeout],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": f"#/components/schemas/{route.request.DESCRIPTOR.name}"}
                        }
                    },
                },
                "responses": {
                    "200": {
                        "description": "OK",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": f"#/components/schemas/{route.response.DESCRIPTOR.name}"}
                            }
                        },
                    },
                    **_errors(400, 401, 403, 413, 429, 503, 504),
                },
            }
        }
    plain = {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}}
    paths["/v1/scenarios"] = {
        "get": {
            "operationId": "ListScenarios",
            "summary": "The configured scenarios: required request fields (JSON names), numItems default",
            "security": [{"bearer": []}],
            "responses": {**plain, **_errors(401, 403)},
        }
    }
    paths["/v1/items"] = {
        "get": {
            "operationId": "DescribeItems",
            "summary": "Category and brand of catalog items",
            "security": [{"bearer": []}],
            "parameters": [
                {"name": "ids", "in": "query", "required": True, "schema": {"type": "string"}},
            ],
            "responses": {**plain, **_errors(400, 401, 403, 503)},
        }
    }
    paths["/healthz"] = {
        "get": {"operationId": "Healthz", "summary": "The process is up", "responses": plain}
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "Readyz",
            "summary": "200 while the gRPC health status is SERVING, else 503",
            "responses": {**plain, "503": {"description": "not serving"}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "recsys gateway HTTP/JSON API", "version": "v1"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


# -- the server -----------------------------------------------------------------------------------


class _InLoopServer(uvicorn.Server):
    """A uvicorn server that leaves signals alone: the gateway's own handlers stop it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (0: any free port); OSError naming it otherwise."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as error:
        sock.close()
        raise OSError(f"gateway: cannot bind HTTP address {host}:{port}: {error}") from error
    return sock


class HttpServer:
    """The HTTP API served by uvicorn as a task of the running event loop."""

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        *,
        max_connections: int,
        grace_seconds: float,
        tls: tuple[Path, Path, Path | None] | None = None,
    ) -> None:
        """``tls``: (cert, key, client CA or None) — the same files the gRPC port uses."""
        self.port: int = sock.getsockname()[1]
        options: dict[str, Any] = {}
        if tls is not None:
            cert, key, client_ca = tls
            options = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
            if client_ca is not None:
                options |= {"ssl_ca_certs": str(client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            app,
            lifespan="off",
            http="h11",
            ws="none",
            log_config=None,  # the process's JSON logging stays as configured
            log_level="warning",
            access_log=False,  # nothing from a request line (or a header) reaches the logs
            server_header=False,
            limit_concurrency=max_connections,  # beyond it uvicorn answers 503 at once
            timeout_graceful_shutdown=max(grace_seconds, MIN_SHUTDOWN_WAIT_S),
            **options,
        )
        self._server = _InLoopServer(config)
        self._socket = sock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))

    async def wait_started(self, timeout_s: float = 10.0) -> None:
        """Return once uvicorn listens; raises if it failed to start."""
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if self._task is not None and self._task.done():
                self._task.result()  # re-raise why it stopped
                raise RuntimeError("HTTP server stopped during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("HTTP server did not start")
            await asyncio.sleep(0.01)

    def begin_stop(self, grace: float | None = None) -> None:
        """Stop accepting connections; requests in flight get ``grace`` seconds (default: the
        configured grace) once :meth:`stop` awaits them."""
        if grace is not None:
            # uvicorn reports a zero wait as "timeout exceeded" even with nothing in flight
            self._server.config.timeout_graceful_shutdown = max(grace, MIN_SHUTDOWN_WAIT_S)
        self._server.should_exit = True

    async def stop(self, grace: float | None = None) -> None:
        """Stop and wait until uvicorn has closed its connections (idempotent)."""
        self.begin_stop(grace)
        if self._task is None:
            self._socket.close()
            return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._task)
