"""A typed Python client of the gateway: ``RecsysClient`` (blocking) and ``AsyncRecsysClient``
(``grpc.aio``), with deadlines, retries of transient failures and bearer tokens.

    from recsys.client import RecsysClient, Event

    with RecsysClient("127.0.0.1:50050", token_file="artifacts/dev-token") as client:
        result = client.recommend("u1", "item_detail", num_items=10, context_items=["i42"])
        for item in result.items:
            print(item.item_id, item.score, item.source)
        client.log_events([Event(user_id="u1", item_id=result.items[0].item_id, type="click")])
        profile = client.user_profile("u1", top_n=5)  # top categories/brands, nearest clusters

Needs only grpcio, protobuf and the generated stubs (``recsys.v1``): nothing here imports the
serving stack (numpy, Faiss, ONNX Runtime), so it runs in a client's own small environment.

Replicas: an address that resolves to several gateways (a Kubernetes headless Service's DNS name,
``dns:///gateway.shop:50050``, or a list, ``ipv4:10.0.0.1:50050,10.0.0.2:50050``) is called
round-robin over all of them, not pinned to the first.

Token: the ``token`` argument, else the first line of ``token_file``, else ``$RECSYS_TOKEN``; it
travels as ``authorization: Bearer <token>`` on every call (use ``tls=True`` off localhost).

Deadlines and retries: ``timeout_s`` bounds each call, retries included (a per-call ``timeout_s``
overrides it). Retries are gRPC's own (the channel's service config, gRFC A6): up to ``retries``
more attempts after exponential backoff (``initial_backoff_s``, doubling, at most
``max_backoff_s``; gRPC core spreads each wait by a random +-20% jitter), only for UNAVAILABLE and
RESOURCE_EXHAUSTED, plus DEADLINE_EXCEEDED answered by the gateway for the idempotent methods
(Recommend reads; LogEvents is idempotent by ``event_id``), never for INVALID_ARGUMENT,
UNAUTHENTICATED or PERMISSION_DENIED. A call is retried only while no response has started, and
retries are throttled per channel when most calls fail (``retryThrottling``), so a struggling
gateway is not hammered. Failures are raised as :class:`RecsysError` subclasses carrying the
gRPC code; :class:`InvalidArgumentError` also names the request field.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from recsys import __version__
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

AUTHORIZATION = "authorization"
TOKEN_ENV = "RECSYS_TOKEN"  # a client's token, for this client, `recsys query` and the bench

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
# Methods safe to repeat after the gateway answered DEADLINE_EXCEEDED: Recommend and GetUserProfile
# only read, and a repeated LogEvents is a duplicate by event_id. ForgetUser is not (it answers how
# much it deleted).
IDEMPOTENT_METHODS = ("Recommend", "LogEvents", "GetUserProfile")
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
MAX_RETRIES = 4  # gRPC makes at most 5 attempts per call, whatever the service config asks

# -- errors ---------------------------------------------------------------------------------


class RecsysError(Exception):
    """A failed call: ``code`` (a ``grpc.StatusCode``) and the gateway's ``details``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(RecsysError):
    """A request field is invalid: ``field`` (e.g. ``context.item_ids``; None when the gateway's
    message names none) and ``message``, the reason."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class UnauthenticatedError(RecsysError):
    """No token, or one the gateway does not know."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAUTHENTICATED, details)


class PermissionDeniedError(RecsysError):
    """The token lacks the scope the call needs (``events``, ``debug``, ``admin``)."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.PERMISSION_DENIED, details)


class ResourceExhaustedError(RecsysError):
    """The gateway shed the call (overloaded) on every attempt."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, details)


class UnavailableError(RecsysError):
    """The gateway (or what it needs) could not be reached on every attempt."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, details)


class DeadlineExceededError(RecsysError):
    """The call's deadline passed."""

    def __init__(self, details: str) -> None:
        super().__init__(grpc.StatusCode.DEADLINE_EXCEEDED, details)


_ERRORS: dict[grpc.StatusCode, type[RecsysError]] = {
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}
# The gateway's INVALID_ARGUMENT details start with the field path: "history[3].item_id: ..."
_FIELD_DETAILS = re.compile(r"(?P<field>[A-Za-z_][\w.\[\]]*): (?P<message>.*)", re.DOTALL)


def error_from_rpc(error: grpc.RpcError) -> RecsysError:
    """The typed error for a failed gRPC call (sync or aio)."""
    code: grpc.StatusCode = error.code()  # type: ignore[attr-defined]
    details: str = error.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        match = _FIELD_DETAILS.fullmatch(details)
        if match is None:
            return InvalidArgumentError(None, details)
        return InvalidArgumentError(match["field"], match["message"])
    error_type = _ERRORS.get(code)
    return error_type(details) if error_type is not None else RecsysError(code, details)


# -- tokens ---------------------------------------------------------------------------------


def read_token(path: str | Path) -> str:
    """The token in ``path`` (its first line, stripped); ValueError if the file holds none."""
    text = Path(path).read_text(encoding="utf-8").strip()
    token = text.splitlines()[0].strip() if text else ""
    if not token:
        raise ValueError(f"{path}: no token in the file")
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``: pass as ``metadata=`` to a stub call."""
    return ((AUTHORIZATION, f"Bearer {token}"),)


def resolve_token(token: str | None = None, token_file: str | Path | None = None) -> str | None:
    """``token``, else the token in ``token_file``, else ``$RECSYS_TOKEN``; None when none is set."""
    if token is not None and token_file is not None:
        raise ValueError("pass token or token_file, not both")
    if token is not None:
        return token.strip() or None
    if token_file is not None:
        return read_token(token_file)
    return os.environ.get(TOKEN_ENV, "").strip() or None


# -- requests and results -------------------------------------------------------------------


def event_type_value(event_type: str | int) -> int:
    """The ``recsys.v1.EventType`` number of ``"click"``, ``"ADD_TO_CART"``, ``"add-to-cart"`` or
    a number; ValueError naming the known types otherwise."""
    if isinstance(event_type, int):
        return event_type  # the gateway judges numbers (INVALID_ARGUMENT naming the field)
    key = event_type.strip().upper().replace("-", "_").replace(" ", "_")
    if key.isdigit():
        return int(key)
    try:
        return common_pb2.EventType.Value(key)
    except ValueError:
        known = ", ".join(name.lower() for name in common_pb2.EventType.keys()[1:])
        raise ValueError(f"unknown event type {event_type!r} (known: {known})") from None


def new_event_id() -> str:
    """A fresh idempotency key for an event."""
    return uuid.uuid4().hex


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Event:
    """Something a user did with an item. ``event_id`` (a new UUID by default) makes a resent
    event a duplicate, so keep the object to resend it; ``timestamp_ms`` defaults to now."""

    user_id: str
    item_id: str
    type: str | int = "view"  # view, click, add_to_cart, purchase
    event_id: str = field(default_factory=new_event_id)
    timestamp_ms: int = field(default_factory=now_ms)
    scenario: str = ""  # the scenario whose recommendation led to it, if any

    def to_proto(self) -> gateway_pb2.Event:
        return gateway_pb2.Event(
            event_id=self.event_id,
            user_id=self.user_id,
            item_id=self.item_id,
            type=event_type_value(self.type),  # type: ignore[arg-type]
            timestamp_ms=self.timestamp_ms,
            scenario=self.scenario,
        )


@dataclass(frozen=True)
class HistoryEntry:
    """One step of a history sent with a request (stateless clients), oldest first."""

    item_id: str
    type: str | int = "view"
    timestamp_ms: int = 0  # 0 = unknown

    def to_proto(self) -> common_pb2.HistoryItem:
        return common_pb2.HistoryItem(
            item_id=self.item_id,
            type=event_type_value(self.type),  # type: ignore[arg-type]
            timestamp_ms=self.timestamp_ms,
        )


@dataclass(frozen=True)
class RecommendedItem:
    """One recommended item. ``explanation``, the stage scores, ``sources`` and
    ``attended_item_ids`` are filled only for ``debug=True`` requests."""

    item_id: str
    score: float
    source: str  # the recall source that produced it
    explanation: str = ""
    recall_score: float = 0.0
    rank_score: float = 0.0
    sources: tuple[str, ...] = ()
    attended_item_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recommendation:
    """The gateway's answer. ``degraded`` says a fallback served it (``degraded_reasons`` say
    which); ``timings_ms`` maps each stage to its milliseconds."""

    request_id: str
    items: tuple[RecommendedItem, ...]
    model_version: str
    degraded: bool
    degraded_reasons: tuple[str, ...]
    timings_ms: Mapping[str, float]

    @property
    def item_ids(self) -> list[str]:
        return [item.item_id for item in self.items]

    @classmethod
    def from_proto(cls, response: gateway_pb2.RecommendResponse) -> Recommendation:
        return cls(
            request_id=response.request_id,
            items=tuple(
                RecommendedItem(
                    item_id=item.item_id,
                    score=item.score,
                    source=item.source,
                    explanation=item.explanation,
                    recall_score=item.recall_score,
                    rank_score=item.rank_score,
                    sources=tuple(item.sources),
                    attended_item_ids=tuple(item.attended_item_ids),
                )
                for item in response.items
            ),
            model_version=response.model_version,
            degraded=response.degraded,
            degraded_reasons=tuple(response.degraded_reasons),
            timings_ms={timing.stage: timing.milliseconds for timing in response.timings},
        )


@dataclass(frozen=True)
class ProfileEntry:
    """A category or brand of the user's history: ``weight`` is its recency- and event-type-weighted
    share (all entries of a kind sum to 1), ``events`` how many events, ``last_seen_ms`` the newest
    (0: no timestamps known)."""

    name: str
    weight: float
    events: int
    last_seen_ms: int


@dataclass(frozen=True)
class NearestAttribute:
    """An attribute cluster near the user embedding: ``kind`` is ``"category"`` or ``"brand"``,
    ``similarity`` the cosine of the user embedding and the cluster's centroid."""

    kind: str
    name: str
    similarity: float


@dataclass(frozen=True)
class UserProfile:
    """The gateway's GetUserProfile answer. ``degraded``: ``nearest`` could not be computed (recall
    down or slow; ``degraded_reasons`` say why), the history part is complete."""

    user_id: str
    categories: tuple[ProfileEntry, ...]
    brands: tuple[ProfileEntry, ...]
    history_length: int
    unknown_items: int
    nearest: tuple[NearestAttribute, ...]
    model_version: str
    degraded: bool
    degraded_reasons: tuple[str, ...]

    @classmethod
    def from_proto(cls, response: gateway_pb2.GetUserProfileResponse) -> UserProfile:
        def entries(values: Iterable[gateway_pb2.ProfileEntry]) -> tuple[ProfileEntry, ...]:
            return tuple(ProfileEntry(e.name, e.weight, e.events, e.last_seen_ms) for e in values)

        return cls(
            user_id=response.user_id,
            categories=entries(response.categories),
            brands=entries(response.brands),
            history_length=response.history_length,
            unknown_items=response.unknown_items,
            nearest=tuple(NearestAttribute(n.kind, n.name, n.similarity) for n in response.nearest),
            model_version=response.model_version,
            degraded=response.degraded,
            degraded_reasons=tuple(response.degraded_reasons),
        )


@dataclass(frozen=True)
class LogEventsResult:
    accepted: int  # newly stored
    duplicates: int  # event_id already seen: ignored


def recommend_request(
    user_id: str,
    scenario: str,
    num_items: int | None = None,
    context_items: Iterable[str] | str = (),
    category: str = "",
    history: Iterable[str | HistoryEntry] | None = None,
    debug: bool = False,
    request_id: str = "",
) -> gateway_pb2.RecommendRequest:
    """The RecommendRequest for :meth:`RecsysClient.recommend`'s arguments."""
    items = [context_items] if isinstance(context_items, str) else list(context_items)
    entries = [HistoryEntry(entry) if isinstance(entry, str) else entry for entry in history or ()]
    return gateway_pb2.RecommendRequest(
        request_id=request_id,
        user_id=user_id,
        scenario=scenario,
        num_items=num_items or 0,  # 0: the scenario's default
        context=gateway_pb2.RecommendContext(item_ids=items, category=category),
        debug=debug,
        history=[entry.to_proto() for entry in entries],
    )


def user_profile_request(
    user_id: str = "", history: Iterable[str | HistoryEntry] | None = None, top_n: int | None = None
) -> gateway_pb2.GetUserProfileRequest:
    """The GetUserProfileRequest for :meth:`RecsysClient.user_profile`'s arguments."""
    entries = [HistoryEntry(entry) if isinstance(entry, str) else entry for entry in history or ()]
    return gateway_pb2.GetUserProfileRequest(
        user_id=user_id,
        history=[entry.to_proto() for entry in entries],
        top_n=top_n or 0,  # 0: the gateway's default (10)
    )


def log_events_request(events: Iterable[Event | gateway_pb2.Event]) -> gateway_pb2.LogEventsRequest:
    return gateway_pb2.LogEventsRequest(
        events=[event.to_proto() if isinstance(event, Event) else event for event in events]
    )


# -- channels -------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def retry_service_config(retries: int, initial_backoff_s: float = 0.1, max_backoff_s: float = 2.0) -> str:
    """The channel's service config (JSON): calls spread round-robin over every address the target
    resolves to (gateway replicas), and gRPC's retry policy per Gateway method."""
    if not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries: must be in 0..{MAX_RETRIES} (gRPC makes at most 5 attempts)")
    balancing = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries == 0:
        return json.dumps({**balancing, "methodConfig": []})

    def policy(codes: Sequence[str]) -> dict[str, Any]:
        return {
            "maxAttempts": retries + 1,
            "initialBackoff": _duration(initial_backoff_s),
            "maxBackoff": _duration(max_backoff_s),
            "backoffMultiplier": 2,
            "retryableStatusCodes": list(codes),
        }

    methods = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].methods
    idempotent = [m.name for m in methods if m.name in IDEMPOTENT_METHODS]
    others = [m.name for m in methods if m.name not in IDEMPOTENT_METHODS]
    method_config = [
        {
            "name": [{"service": GATEWAY_SERVICE, "method": name} for name in idempotent],
            "retryPolicy": policy([*RETRYABLE_CODES, "DEADLINE_EXCEEDED"]),
        },
        {
            "name": [{"service": GATEWAY_SERVICE, "method": name} for name in others],
            "retryPolicy": policy(RETRYABLE_CODES),
        },
    ]
    # Each failure costs a token, each success gives back 0.1; below half of maxTokens, no retries.
    throttling = {"maxTokens": 10, "tokenRatio": 0.1}
    return json.dumps({**balancing, "methodConfig": method_config, "retryThrottling": throttling})


class _ClientBase:
    """What both clients share: token, deadline, retry policy and the channel's settings."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        tls: bool | grpc.ChannelCredentials = False,
        timeout_s: float = 5.0,
        retries: int = 3,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
        self.address = address
        self.timeout_s = timeout_s
        token_value = resolve_token(token, token_file)
        self._metadata = bearer_metadata(token_value) if token_value is not None else None
        if tls is True:
            self._credentials: grpc.ChannelCredentials | None = grpc.ssl_channel_credentials()
        else:
            self._credentials = tls or None
        self._options = [
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry_service_config(retries, initial_backoff_s, max_backoff_s)),
            ("grpc.primary_user_agent", f"recsys-client/{__version__}"),
            *options,
        ]
        self._channel = self._open_channel()
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def _open_channel(self) -> Any:
        raise NotImplementedError

    def _timeout(self, timeout_s: float | None) -> float:
        return self.timeout_s if timeout_s is None else timeout_s


class RecsysClient(_ClientBase):
    """Blocking client of the gateway; thread-safe, one channel. Use as a context manager or
    :meth:`close` it. Arguments: see the module docstring (``tls``: True for the system's roots,
    or ``grpc.ssl_channel_credentials(...)`` for your own CA / a client certificate)."""

    def _open_channel(self) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(self.address, options=self._options)
        return grpc.secure_channel(self.address, self._credentials, options=self._options)

    def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout_s), metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error

    def recommend(
        self,
        user_id: str,
        scenario: str,
        num_items: int | None = None,
        context_items: Iterable[str] | str = (),
        category: str = "",
        history: Iterable[str | HistoryEntry] | None = None,
        debug: bool = False,
        *,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> Recommendation:
        """Items for ``user_id`` in ``scenario`` (``num_items`` None: the scenario's default).
        ``context_items``: the viewed item or the cart; ``history`` (item ids or
        :class:`HistoryEntry`, oldest first) replaces the stored history; ``debug`` needs the
        token's ``debug`` scope."""
        request = recommend_request(
            user_id, scenario, num_items, context_items, category, history, debug, request_id
        )
        return Recommendation.from_proto(self._call(self._stub.Recommend, request, timeout_s))

    def log_events(
        self, events: Iterable[Event | gateway_pb2.Event], *, timeout_s: float | None = None
    ) -> LogEventsResult:
        """Store ``events`` (all or none: one bad event fails the call, naming it)."""
        response = self._call(self._stub.LogEvents, log_events_request(events), timeout_s)
        return LogEventsResult(accepted=response.accepted, duplicates=response.duplicates)

    def forget_user(self, user_id: str, *, timeout_s: float | None = None) -> int:
        """Delete the user's history and mark them for exclusion from training (the ``admin``
        scope); returns how many stored events were deleted."""
        request = gateway_pb2.ForgetUserRequest(user_id=user_id)
        return self._call(self._stub.ForgetUser, request, timeout_s).deleted_events

    def user_profile(
        self,
        user_id: str = "",
        history: Iterable[str | HistoryEntry] | None = None,
        top_n: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> UserProfile:
        """``user_id``'s top categories and brands from their history (``history``, item ids or
        :class:`HistoryEntry` oldest first, replaces the stored one; then ``user_id`` may be empty)
        and the attribute clusters nearest their embedding, ``top_n`` (1..100, None: 10) of each;
        needs the token's ``recommend`` scope."""
        request = user_profile_request(user_id, history, top_n)
        return UserProfile.from_proto(self._call(self._stub.GetUserProfile, request, timeout_s))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RecsysClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class AsyncRecsysClient(_ClientBase):
    """The ``grpc.aio`` client: the same methods as :class:`RecsysClient`, awaited. Create it in
    the event loop that uses it; ``async with`` it or await :meth:`close`."""

    def _open_channel(self) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(self.address, options=self._options)
        return grpc.aio.secure_channel(self.address, self._credentials, options=self._options)

    async def _call(self, method: Any, request: Any, timeout_s: float | None) -> Any:
        try:
            return await method(request, timeout=self._timeout(timeout_s), metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error

    async def recommend(
        self,
        user_id: str,
        scenario: str,
        num_items: int | None = None,
        context_items: Iterable[str] | str = (),
        category: str = "",
        history: Iterable[str | HistoryEntry] | None = None,
        debug: bool = False,
        *,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> Recommendation:
        """See :meth:`RecsysClient.recommend`."""
        request = recommend_request(
            user_id, scenario, num_items, context_items, category, history, debug, request_id
        )
        return Recommendation.from_proto(await self._call(self._stub.Recommend, request, timeout_s))

    async def log_events(
        self, events: Iterable[Event | gateway_pb2.Event], *, timeout_s: float | None = None
    ) -> LogEventsResult:
        """See :meth:`RecsysClient.log_events`."""
        response = await self._call(self._stub.LogEvents, log_events_request(events), timeout_s)
        return LogEventsResult(accepted=response.accepted, duplicates=response.duplicates)

    async def forget_user(self, user_id: str, *, timeout_s: float | None = None) -> int:
        """See :meth:`RecsysClient.forget_user`."""
        request = gateway_pb2.ForgetUserRequest(user_id=user_id)
        return (await self._call(self._stub.ForgetUser, request, timeout_s)).deleted_events

    async def user_profile(
        self,
        user_id: str = "",
        history: Iterable[str | HistoryEntry] | None = None,
        top_n: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> UserProfile:
        """See :meth:`RecsysClient.user_profile`."""
        request = user_profile_request(user_id, history, top_n)
        return UserProfile.from_proto(await self._call(self._stub.GetUserProfile, request, timeout_s))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRecsysClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
