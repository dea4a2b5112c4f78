"""Request validation shared by every servicer: each bad field becomes ``INVALID_ARGUMENT`` with a
message that starts with the field path (``k: must be in 1..10000, got 0``); any other failure
becomes ``INTERNAL`` with the traceback logged, never ``UNKNOWN``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

logger = logging.getLogger(__name__)

Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


class InvalidArgument(Exception):
    """A request field is invalid. ``str(error)`` is ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


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
        raise InvalidArgument(field, f"must not contain whitespace or control characters, got {value!r}")


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
        except InvalidArgument as error:
            logger.debug(
                "invalid argument",
                extra={"method": handler.__qualname__, "field": error.field, "request_id": _request_id(args)},
            )
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception(
                "unhandled error in gRPC method",
                extra={"method": handler.__qualname__, "request_id": _request_id(args)},
            )
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return checked  # type: ignore[return-value]
