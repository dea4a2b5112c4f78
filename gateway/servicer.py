"""The Gateway gRPC methods: thin — validate, shed load, call the pipeline or the history store."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import NoReturn

import grpc
from prometheus_client import CollectorRegistry

from gateway import profile
from gateway.history import HistoryStore, StoredEvent
from gateway.impressions import ImpressionLog, ImpressionMetrics
from gateway.metrics import GatewayMetrics
from gateway.response import scored_items
from recsys.scenario.candidates import History
from recsys.scenario.catalog import Catalog
from recsys.scenario.config import Scenario, ScenarioSet
from recsys.scenario.context import CatalogMismatchError, PipelineUnavailable, RecommendInputs
from recsys.scenario.pipeline import Pipeline, given_history, stored_history
from recsys.scenario.spec import MAX_NUM_ITEMS
from recsys.scenario.stages import call_downstream, failure_reason
from recsys.serving.metrics import bundle_info
from recsys.serving.validation import (
    InvalidArgument,
    grpc_method,
    require,
    require_id,
    require_in_range,
    require_text,
    shorten,
)
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, recall_pb2

log = logging.getLogger(__name__)

MAX_EVENTS_PER_CALL = 1000
MAX_REQUEST_HISTORY = 1000
MAX_CONTEXT_ITEMS = 100
MAX_CATEGORY_LENGTH = 256
FUTURE_TOLERANCE_MS = 5 * 60 * 1000  # client clocks may run this far ahead of ours
PROFILE_RESERVE_S = 0.002  # GetUserProfile: kept back from the recall call for the response
EVENT_TYPE_NAMES = {
    common_pb2.VIEW: "view",
    common_pb2.CLICK: "click",
    common_pb2.ADD_TO_CART: "add_to_cart",
    common_pb2.PURCHASE: "purchase",
}


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """Recommend, LogEvents and ForgetUser. Scenarios are read per request from ``scenarios()``
    (reloadable)."""

    def __init__(
        self,
        scenarios: Callable[[], ScenarioSet],
        pipeline: Pipeline,
        history_store: HistoryStore,
        registry: CollectorRegistry,
        max_in_flight: int,
        default_deadline_s: float,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        impressions: ImpressionLog | None = None,
    ):
        self.scenarios = scenarios
        self.pipeline = pipeline
        self.history_store = history_store
        self.registry = registry
        self.metrics: GatewayMetrics = pipeline.metrics
        self.max_in_flight = max_in_flight
        self.default_deadline_s = default_deadline_s
        self.clock_ms = clock_ms
        self.impressions = impressions or ImpressionLog(ImpressionMetrics(registry))
        self.in_flight = 0
        self._reported_versions: dict[str, str] = {}

    # -- load shedding ------------------------------------------------------------------------

    async def _enter(self, context: grpc.aio.ServicerContext, scenario_label: str | None) -> None:
        """Admit the call or reject it at once: never queue beyond ``max_in_flight``."""
        if self.in_flight >= self.max_in_flight:
            if scenario_label is not None:
                self.metrics.requests.labels(scenario_label, "shed").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"gateway overloaded: {self.in_flight} requests in flight (limit {self.max_in_flight})",
            )
        self.in_flight += 1
        self.metrics.in_flight.inc()

    def _leave(self) -> None:
        self.in_flight -= 1
        self.metrics.in_flight.dec()

    # -- Recommend ----------------------------------------------------------------------------

    def _validate_recommend(
        self, request: gateway_pb2.RecommendRequest, scenario: Scenario | None, scenario_set: ScenarioSet
    ) -> RecommendInputs:
        require(bool(request.scenario), "scenario", f"must be one of {sorted(scenario_set.scenarios)}")
        if scenario is None:
            raise InvalidArgument(
                "scenario",
                f"unknown scenario {shorten(request.scenario)}; known: {sorted(scenario_set.scenarios)}",
            )
        require_in_range(request.num_items, "num_items", 0, MAX_NUM_ITEMS)  # 0: the scenario's default
        require_id(request.request_id, "request_id", allow_empty=True)
        required = scenario.required_fields
        require_id(request.user_id, "user_id", allow_empty="user_id" not in required)
        context_ids = list(request.context.item_ids)
        require(
            bool(context_ids) or "context.item_ids" not in required,
            "context.item_ids",
            f"required by scenario {scenario.name!r} (its recall stage is seeded by the context items)",
        )
        require(
            len(context_ids) <= MAX_CONTEXT_ITEMS,
            "context.item_ids",
            f"at most {MAX_CONTEXT_ITEMS} items, got {len(context_ids)}",
        )
        for i, item_id in enumerate(context_ids):
            require_id(item_id, f"context.item_ids[{i}]")
        require_text(request.context.category, "context.category", max_length=MAX_CATEGORY_LENGTH)
        require(
            bool(request.context.category) or "context.category" not in required,
            "context.category",
            f"required by scenario {scenario.name!r} (its recall stage filters by category)",
        )
        validate_history(request.history)
        # Every answer has a request id (events quote it back for attribution), and a user in an
        # experiment gets the variant of their arm.
        request_id = request.request_id or uuid.uuid4().hex
        return RecommendInputs(
            scenario=scenario.variant_for(request.user_id or request_id),
            user_id=request.user_id,
            num_items=request.num_items or scenario.default_num_items,
            context_item_ids=tuple(context_ids),
            context_category=request.context.category,
            history=tuple(request.history) if request.history else None,
            debug=request.debug,
            request_id=request_id,
        )

    @grpc_method
    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        scenario_set = self.scenarios()
        scenario = scenario_set.get(request.scenario)
        label = scenario.name if scenario is not None else "unknown"
        await self._enter(context, label)
        try:
            try:
                inputs = self._validate_recommend(request, scenario, scenario_set)
            except InvalidArgument:
                self.metrics.requests.labels(label, "invalid").inc()
                raise
            assert scenario is not None
            remaining = context.time_remaining()
            budget_s = min(
                self.default_deadline_s if remaining is None else remaining, scenario.timeout_ms / 1000
            )
            try:
                result = await self.pipeline.run(inputs, time.monotonic() + budget_s)
            except InvalidArgument:  # a field only the catalog can judge (an unknown category)
                self.metrics.requests.labels(label, "invalid").inc()
                raise
            except PipelineUnavailable as error:
                self.metrics.requests.labels(label, "error").inc()
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
            except Exception:
                self.metrics.requests.labels(label, "error").inc()
                raise
            self.metrics.requests.labels(label, "degraded" if result.degraded else "ok").inc()
            self._report_versions(result.model_versions)
            variant = inputs.scenario
            self.impressions.record(inputs.request_id, inputs.user_id, variant, result)
            return gateway_pb2.RecommendResponse(
                request_id=inputs.request_id,
                experiment=variant.experiment_name,
                arm=variant.arm,
                items=scored_items(result, request.debug),
                model_version=result.model_version,
                degraded=result.degraded,
                degraded_reasons=result.degraded_reasons,
                timings=[
                    gateway_pb2.StageTiming(stage=stage, milliseconds=ms)
                    for stage, ms in result.timings_ms.items()
                ],
            )
        finally:
            self._leave()

    def _report_versions(self, versions: dict[str, str]) -> None:
        """Expose the downstream bundle versions the gateway is being served by."""
        for kind, version in versions.items():
            if version and self._reported_versions.get(kind) != version:
                self._reported_versions[kind] = version
                bundle_info(self.registry, "gateway", kind, version)

    # -- LogEvents ----------------------------------------------------------------------------

    def _validate_events(self, request: gateway_pb2.LogEventsRequest) -> list[StoredEvent]:
        require(len(request.events) > 0, "events", "must not be empty")
        require(
            len(request.events) <= MAX_EVENTS_PER_CALL,
            "events",
            f"at most {MAX_EVENTS_PER_CALL} events per call, got {len(request.events)}",
        )
        now_ms = self.clock_ms()
        events = []
        for i, event in enumerate(request.events):
            where = f"events[{i}]"
            require_id(event.event_id, f"{where}.event_id")
            require_id(event.user_id, f"{where}.user_id")
            require_id(event.item_id, f"{where}.item_id")
            require(
                event.type in EVENT_TYPE_NAMES,
                f"{where}.type",
                f"must be one of VIEW, CLICK, ADD_TO_CART, PURCHASE, got {_type_name(event.type)}",
            )
            require(
                event.timestamp_ms >= 0, f"{where}.timestamp_ms", f"must be >= 0, got {event.timestamp_ms}"
            )
            require(
                event.timestamp_ms <= now_ms + FUTURE_TOLERANCE_MS,
                f"{where}.timestamp_ms",
                f"must not be more than {FUTURE_TOLERANCE_MS // 1000} s in the future, got "
                f"{(event.timestamp_ms - now_ms) / 1000:.0f} s ahead",
            )
            require_id(event.scenario, f"{where}.scenario", allow_empty=True)
            require_id(event.request_id, f"{where}.request_id", allow_empty=True)
            events.append(
                StoredEvent(
                    event_id=event.event_id,
                    user_id=event.user_id,
                    item_id=event.item_id,
                    event_type=event.type,
                    timestamp_ms=event.timestamp_ms or now_ms,  # 0 = unknown: the time it arrived
                    scenario=event.scenario,
                )
            )
        return events

    @grpc_method
    async def LogEvents(
        self, request: gateway_pb2.LogEventsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.LogEventsResponse:
        await self._enter(context, None)
        try:
            events = self._validate_events(request)  # all or nothing: nothing stored on a bad field
            try:
                stored = await self.history_store.append(events)
            except Exception as error:
                await _store_unavailable(context, "LogEvents", error)
            scenario_set = self.scenarios()
            for event, message, new in zip(events, request.events, stored.stored, strict=True):
                if new:  # a retried event is not counted twice
                    self.metrics.events_ingested.labels(EVENT_TYPE_NAMES[event.event_type]).inc()
                    self.impressions.attribute(
                        message.request_id,
                        event.user_id,
                        event.item_id,
                        event.event_type,
                        event.scenario,
                        scenario_set,
                        self.pipeline.catalog,
                    )
            return gateway_pb2.LogEventsResponse(accepted=stored.accepted, duplicates=stored.duplicates)
        finally:
            self._leave()

    # -- ForgetUser ---------------------------------------------------------------------------

    @grpc_method
    async def ForgetUser(
        self, request: gateway_pb2.ForgetUserRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ForgetUserResponse:
        require_id(request.user_id, "user_id")
        try:
            deleted = await self.history_store.forget(request.user_id)
        except Exception as error:
            await _store_unavailable(context, "ForgetUser", error)
        log.info("user forgotten: %d stored events deleted", deleted)  # no user id at INFO
        return gateway_pb2.ForgetUserResponse(deleted_events=deleted)

    # -- GetUserProfile -----------------------------------------------------------------------

    def _validate_user_profile(self, request: gateway_pb2.GetUserProfileRequest) -> int:
        """Check the request (fields in message order); returns the effective ``top_n``."""
        require(
            bool(request.user_id) or len(request.history) > 0,
            "user_id",
            "must not be empty (or send the history)",
        )
        require_id(request.user_id, "user_id", allow_empty=True)
        validate_history(request.history)
        require_in_range(request.top_n, "top_n", 0, profile.MAX_TOP_N)  # 0: the default
        return request.top_n or profile.DEFAULT_TOP_N

    async def _profile_history(
        self,
        request: gateway_pb2.GetUserProfileRequest,
        catalog: Catalog,
        deadline: float,
        context: grpc.aio.ServicerContext,
    ) -> History:
        """The request's own history (stateless clients), else the stored one; the store failing
        is UNAVAILABLE (the history is the profile), slower than the deadline DEADLINE_EXCEEDED."""
        limit = self.pipeline.max_history_length
        if request.history:
            return given_history(request.history[-limit:], catalog)
        try:
            events = await asyncio.wait_for(
                self.history_store.history(request.user_id, limit), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "history store slower than the deadline")
        except Exception as error:
            await _store_unavailable(context, "GetUserProfile", error)
        return stored_history(events, catalog)

    async def _nearest_attributes(
        self, history: History, catalog: Catalog, top_n: int, deadline: float
    ) -> tuple[list[profile.NearestAttribute], str, list[str]]:
        """(nearest clusters, recall's model version, degraded reasons): asked of recall (a
        sharded recall asks its shards in turn); nothing to ask without a known history item; any
        failure leaves the list empty with a reason."""
        if not len(history.known):
            return [], "", []
        history_items, history_types = history.packed
        request = recall_pb2.UserProfileRequest(
            catalog=catalog.fingerprint,
            history_items=history_items,
            history_types=history_types,
            top_n=top_n,
        )
        timeout = deadline - time.monotonic() - PROFILE_RESERVE_S
        try:
            response = await call_downstream(
                self.pipeline.recall.UserProfile, request, timeout, "recall", catalog
            )
            return profile.nearest_attributes(response, catalog), response.model_version, []
        except (grpc.aio.AioRpcError, TimeoutError, ValueError, CatalogMismatchError) as error:
            reason = failure_reason("recall", error)
            log.warning("GetUserProfile: recall failed, nearest attributes left out: %s", reason)
            if reason.endswith("catalog_mismatch"):
                self.pipeline.refresh_catalog_soon()
            return [], "", [reason]

    @grpc_method
    async def GetUserProfile(
        self, request: gateway_pb2.GetUserProfileRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetUserProfileResponse:
        await self._enter(context, None)
        try:
            top_n = self._validate_user_profile(request)
            remaining = context.time_remaining()
            deadline = time.monotonic() + (self.default_deadline_s if remaining is None else remaining)
            catalog = self.pipeline.catalog
            if catalog is None:  # item ids mean nothing without it
                self.pipeline.refresh_catalog_soon()
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    "recall has not served the catalog yet: no profile to compute",
                )
            history = await self._profile_history(request, catalog, deadline, context)
            summary = profile.history_profile(history, catalog, self.clock_ms(), top_n)
            if summary.unknown_items:
                self.metrics.unknown_items.inc(summary.unknown_items)
            nearest, recall_version, reasons = await self._nearest_attributes(
                history, catalog, top_n, deadline
            )
            return gateway_pb2.GetUserProfileResponse(
                user_id=request.user_id,
                categories=[_profile_entry(entry) for entry in summary.categories],
                brands=[_profile_entry(entry) for entry in summary.brands],
                history_length=summary.history_length,
                unknown_items=summary.unknown_items,
                nearest=[
                    gateway_pb2.NearestAttribute(kind=near.kind, name=near.name, similarity=near.similarity)
                    for near in nearest
                ],
                model_version=f"recall={recall_version or catalog.version}",
                degraded=bool(reasons),
                degraded_reasons=reasons,
            )
        finally:
            self._leave()


def validate_history(history: Sequence[common_pb2.HistoryItem]) -> None:
    """A stateless client's history: bounded, each item an id, a known event type and a time."""
    require(
        len(history) <= MAX_REQUEST_HISTORY,
        "history",
        f"at most {MAX_REQUEST_HISTORY} items, got {len(history)}",
    )
    for i, entry in enumerate(history):
        require_id(entry.item_id, f"history[{i}].item_id")
        require(
            entry.type in common_pb2.EventType.values(),
            f"history[{i}].type",
            f"unknown event type {entry.type}",
        )
        require(
            entry.timestamp_ms >= 0,
            f"history[{i}].timestamp_ms",
            f"must be >= 0 (0 = unknown), got {entry.timestamp_ms}",
        )


async def _store_unavailable(context: grpc.aio.ServicerContext, method: str, error: Exception) -> NoReturn:
    """A failed history store call -> UNAVAILABLE: clients retry it, and a retry is safe because
    appends are idempotent by event_id (INTERNAL would tell them not to)."""
    log.warning("%s: history store failed: %r", method, error)
    await context.abort(
        grpc.StatusCode.UNAVAILABLE, f"history store unavailable ({type(error).__name__}); retry"
    )


def _profile_entry(entry: profile.ProfileEntry) -> gateway_pb2.ProfileEntry:
    return gateway_pb2.ProfileEntry(
        name=entry.name, weight=entry.weight, events=entry.events, last_seen_ms=entry.last_seen_ms
    )


def _type_name(value: int) -> str:
    try:
        return common_pb2.EventType.Name(value)
    except ValueError:
        return str(value)
