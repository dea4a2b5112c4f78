"""Request validation shared by every servicer: each bad field becomes ``INVALID_ARGUMENT`` with a
message that starts with the field path (``k: must be in 1..10000, got 0``); any other failure
becomes ``INTERNAL`` with the traceback logged, never ``UNKNOWN``.

Messages echo at most ``MAX_ECHO_CHARS`` characters of a client's value (:func:`shorten`), so a
20 KB field gets a short INVALID_ARGUMENT rather than a reply too large for gRPC's metadata limit.
A request that cannot even be parsed (invalid UTF-8 in a string field, truncated bytes) is turned
into :class:`MalformedRequest` by :class:`MalformedRequestInterceptor` (installed by the serving
bootstrap on every server) and answered ``INVALID_ARGUMENT`` naming the field, before the handler.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor

logger = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])

MAX_ECHO_CHARS = 64  # most characters of a client's value an error message repeats
MAX_DETAILS_CHARS = 1024  # INVALID_ARGUMENT details are cut here whatever the message


class StatusError(Exception):
    """A request the service refuses for a reason that is not a bad field; ``status`` is the gRPC
    code every transport answers with (``grpc_method`` aborts with it, the in-process backends
    raise it as the status error a stub would)."""

    status: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The status error a gRPC stub raises with ``code``, for answers that did not come from a
    call of their own (an in-process backend, one request of a batch call, a fan-out)."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class InvalidArgument(Exception):
    """A request field is invalid. ``str(error)`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


EXPECTED_ERRORS = (InvalidArgument, StatusError)  # refusals a handler raises on purpose


def error_status(error: InvalidArgument | StatusError) -> tuple[grpc.StatusCode, str]:
    """The status every transport answers an expected error with: INVALID_ARGUMENT naming the
    field, or a StatusError's own code; details cut to MAX_DETAILS_CHARS."""
    code = grpc.StatusCode.INVALID_ARGUMENT if isinstance(error, InvalidArgument) else error.status
    return code, str(error)[:MAX_DETAILS_CHARS]


def shorten(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters (the length noted)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(value)} characters)"


def require(condition: bool, field: str, reason: str) -> None:
    """Raise InvalidArgument(field, reason) unless ``condition`` holds."""
    if not condition:
        raise InvalidArgument(field, reason)


def require_in_range(value: float, field: str, low: float, high: float) -> None:
    """Require ``low <= value <= high`` (inclusive; NaN is rejected)."""
    if isinstance(value, float) and math.isnan(value):
        raise InvalidArgument(field, f"must be in {low}..{high}, got NaN")
    if not low <= value <= high:
        raise InvalidArgument(field, f"must be in {low}..{high}, got {value}")


def require_id(value: str, field: str, *, allow_empty: bool = False, max_length: int = 256) -> None:
    """Require an external id: non-empty (unless allowed), at most ``max_length`` characters,
    printable, with no whitespace or control characters."""
    if not value:
        if allow_empty:
            return
        raise InvalidArgument(field, "must not be empty")
    if len(value) > max_length:
        raise InvalidArgument(field, f"must be at most {max_length} characters, got {len(value)}")
    if not value.isprintable() or any(character.isspace() for character in value):
        raise InvalidArgument(
            field, f"must not contain whitespace or control characters, got {shorten(value)}"
        )


def require_text(value: str, field: str, *, max_length: int = 256) -> None:
    """Require free text (a category name, may contain spaces): at most ``max_length``
    characters, no control characters or line breaks. Empty is allowed."""
    if len(value) > max_length:
        raise InvalidArgument(field, f"must be at most {max_length} characters, got {len(value)}")
    if not value.isprintable():
        raise InvalidArgument(field, f"must not contain control characters, got {shorten(value)}")


def _request_id(args: tuple[Any, ...]) -> str:
    """The request's ``request_id`` field, if the request message has one (for log correlation)."""
    for arg in args:
        request_id = getattr(arg, "request_id", None)
        if isinstance(request_id, str):
            return request_id
    return ""


def grpc_method(handler: Handler) -> Handler:
    """Decorate an async gRPC handler ``(self, request, context)`` (or ``(request, context)``).

    ``InvalidArgument`` -> ``INVALID_ARGUMENT`` with ``str(error)`` as details; an abort by the
    handler passes through unchanged; any other exception is logged with its traceback and becomes
    ``INTERNAL: internal error`` (gRPC would otherwise send ``UNKNOWN``).
    """
    if not inspect.iscoroutinefunction(handler):
        raise TypeError(f"grpc_method needs an async def handler, got {handler!r}")

    @functools.wraps(handler)
    async def checked(*args: Any) -> Any:
        context: grpc.aio.ServicerContext = args[-1]
        try:
            return await handler(*args)
        except EXPECTED_ERRORS as error:
            if isinstance(error, InvalidArgument):
                logger.debug(
                    "invalid argument",
                    extra={
                        "method": handler.__qualname__,
                        "field": error.field,
                        "request_id": _request_id(args),
                    },
                )
            await context.abort(*error_status(error))
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception(
                "unhandled error in gRPC method",
                extra={"method": handler.__qualname__, "request_id": _request_id(args)},
            )
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return checked  # type: ignore[return-value]


# -- requests that do not parse ---------------------------------------------------------------


@dataclass(frozen=True)
class MalformedRequest:
    """Stands in for a request whose bytes did not deserialize; the handler is never called."""

    field: str  # "history[2].item_id", or "request" when no single field is to blame
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


def _read_varint(data: memoryview, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def invalid_utf8_field(descriptor: Descriptor, data: bytes, _prefix: str = "", _depth: int = 0) -> str | None:
    """The path (``history[2].item_id``) of the first string field of the serialized message
    ``data`` of type ``descriptor`` whose bytes are not UTF-8; None when there is none or when
    ``data`` is not well-formed protobuf wire format."""
    view = memoryview(data)
    seen: dict[int, int] = {}
    position = 0
    try:
        while position < len(view):
            key, position = _read_varint(view, position)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, position = _read_varint(view, position)
            elif wire_type in (1, 5):
                position += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                length, position = _read_varint(view, position)
                value = view[position : position + length]
                position += length
                field = descriptor.fields_by_number.get(number)
                if field is None or position > len(view):
                    continue
                index = seen.get(number, 0)
                seen[number] = index + 1
                path = _prefix + field.name + (f"[{index}]" if field.is_repeated else "")
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        str(value, "utf-8")
                    except UnicodeDecodeError:
                        return path
                elif field.type == FieldDescriptor.TYPE_MESSAGE and _depth < 100:
                    found = invalid_utf8_field(field.message_type, value, f"{path}.", _depth + 1)
                    if found is not None:
                        return found
            else:  # groups (3, 4) are not used by proto3 messages
                return None
    except ValueError:
        return None
    return None


def tolerant_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """Wrap a request deserializer (``Message.FromString``) so that bytes it rejects become a
    :class:`MalformedRequest` naming the field (instead of an exception gRPC answers UNKNOWN)."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    type_name = descriptor.full_name if isinstance(descriptor, Descriptor) else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except InvalidArgument as error:  # a deserializer that validates as it decodes
            return MalformedRequest(error.field, error.reason)
        except Exception:
            field = invalid_utf8_field(descriptor, data) if isinstance(descriptor, Descriptor) else None
            if field is not None:
                return MalformedRequest(field, "must be valid UTF-8")
            return MalformedRequest("request", f"cannot be parsed as {type_name} ({len(data)} bytes)")

    return deserialize


async def _abort_malformed(request: MalformedRequest, context: grpc.aio.ServicerContext) -> None:
    logger.debug("malformed request", extra={"field": request.field})
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))


def _reject_malformed(behavior: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):

        async def checked_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, MalformedRequest):
                await _abort_malformed(request, context)
            async for response in behavior(request, context):
                yield response

        return checked_stream

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, MalformedRequest):
            await _abort_malformed(request, context)
        return await behavior(request, context)

    return checked


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """For every unary-request method with an async handler: a request that does not deserialize
    is answered ``INVALID_ARGUMENT`` (``history[2].item_id: must be valid UTF-8``) instead of
    ``UNKNOWN``, and, placed inside the metrics interceptor, is counted like any other status."""

    def __init__(self) -> None:
        # Per method: the handler last seen and its tolerant version (handlers are static per
        # method, so each is wrapped once, and the outer interceptors see a stable object).
        self._tolerant: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        cached = self._tolerant.get(handler_call_details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        tolerant = self._tolerate(handler)
        self._tolerant[handler_call_details.method] = (handler, tolerant)
        return tolerant

    @staticmethod
    def _tolerate(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        name = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, name)
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a synchronous handler (thread pool) keeps gRPC's own handling
        return handler._replace(
            request_deserializer=tolerant_deserializer(handler.request_deserializer),
            **{name: _reject_malformed(behavior)},
        )
