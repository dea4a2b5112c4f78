"""Start the gateway: downstream channels, history store, scenario registry, servicer, bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from gateway.config import GatewayConfig
from gateway.history import HistoryStore, open_history_store
from gateway.http_api import HttpApi, HttpServer, bind_socket
from gateway.metrics import GatewayMetrics, downstream_call_size, downstream_releases
from gateway.recall_fanout import ShardedRecall
from gateway.scenarios import ScenarioRegistry
from gateway.servicer import GatewayServicer
from recsys.scenario.pipeline import CATALOG_TIMEOUT_S, Pipeline
from recsys.serving.auth import AccessPolicy, BearerAuthInterceptor, TokenFile
from recsys.serving.batch_calls import CoalescedStub
from recsys.serving.bootstrap import (
    HEALTH_SERVICE_NAME,
    REFLECTION_SERVICE_NAME,
    RunningServer,
    client_channel_credentials,
    open_channel,
    start_server,
)
from recsys.serving.config import DEFAULT_MAX_MESSAGE_BYTES
from recsys.serving.metrics import bundle_info, new_registry
from recsys.v1 import gateway_pb2, gateway_pb2_grpc, rank_pb2, rank_pb2_grpc, recall_pb2, recall_pb2_grpc

log = logging.getLogger(__name__)

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
CATALOG_RETRY_S = 5.0  # catalog refresh interval while none is held

# Who may call what: the scope each Gateway method needs; `debug=true` on Recommend also needs
# `debug` (it reveals the user's history items). Health checks and reflection stay open for probes.
GATEWAY_ACCESS = AccessPolicy(
    method_scopes={
        f"/{GATEWAY_SERVICE}/Recommend": "recommend",
        f"/{GATEWAY_SERVICE}/LogEvents": "events",
        f"/{GATEWAY_SERVICE}/ForgetUser": "admin",
        # a profile is the user's data read back, like their recommendations
        f"/{GATEWAY_SERVICE}/GetUserProfile": "recommend",
    },
    open_services=frozenset({HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME}),
    request_scopes={f"/{GATEWAY_SERVICE}/Recommend": lambda request: ("debug",) if request.debug else ()},
)


def auth_interceptor(config: GatewayConfig) -> BearerAuthInterceptor | None:
    """The bearer-token interceptor for ``config.auth_tokens_file`` (gRPC and HTTP share it); None
    (and a warning) when the gateway runs without authentication (``allow_unauthenticated``)."""
    if config.auth_tokens_file is not None:
        return BearerAuthInterceptor(TokenFile(config.auth_tokens_file), GATEWAY_ACCESS)
    log.warning(
        "serving WITHOUT authentication (allow_unauthenticated): anyone who reaches this port can "
        "read recommendations and write events for any user"
    )
    return None


class GatewayServer:
    """A running gateway: the bootstrap's :class:`RunningServer` plus the gateway's own resources
    (channels, history store, background tasks), all released by :meth:`stop`."""

    def __init__(
        self,
        running: RunningServer,
        servicer: GatewayServicer,
        scenarios: ScenarioRegistry,
        channels: list[grpc.aio.Channel],
        history_store: HistoryStore,
        tasks: list[asyncio.Task[None]],
        http: HttpServer | None = None,
    ):
        self.running = running
        self.http = http
        self.servicer = servicer
        self.scenarios = scenarios
        self._channels = channels
        self._history_store = history_store
        self._tasks = tasks
        self._closed = False

    def __getattr__(self, name: str) -> Any:  # port, metrics_port, registry, address, server, ...
        return getattr(self.running, name)

    @property
    def http_port(self) -> int | None:
        """The HTTP/JSON API's port; None when it is off (``http_enabled=False``)."""
        return self.http.port if self.http is not None else None

    def reload_scenarios(self) -> bool:
        """Reload the scenario file now (SIGHUP); False when the new file was rejected."""
        return self.scenarios.reload()

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (in-flight calls get ``grace``), then close channels and the store."""
        if self.http is not None:
            self.http.begin_stop(grace)  # no new HTTP connections; in-flight requests finish
        await self.running.stop(grace)
        if self.http is not None:
            await self.http.stop(grace)
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.servicer.pipeline.close()
        for channel in self._channels:
            await channel.close()
        await self._history_store.close()


async def serve(
    config: GatewayConfig,
    registry: CollectorRegistry | None = None,
    backends: tuple[Any | None, Any | None] | None = None,
) -> GatewayServer:
    """Start the gateway; returns once it is SERVING (with recall's catalog when recall is up).

    ``backends`` (recall, rank) replaces the gRPC stubs by objects with the same methods (the
    in-process backends of ``recsys.app.inprocess``); a None in it, or no ``backends``, is that
    service over gRPC at ``config.recall_address(es)`` / ``config.rank_address``."""
    registry = new_registry() if registry is None else registry
    reload_errors = Counter(
        "recsys_scenario_reload_errors",
        "Scenario config reloads rejected (the previous config kept serving)",
        registry=registry,
    )
    scenarios = ScenarioRegistry(
        config.scenarios_path,
        config.reload_interval_s,
        on_reload=lambda current: bundle_info(registry, "gateway", "scenarios", current.digest),
        on_error=lambda _message: reload_errors.inc(),
    )
    history_store = open_history_store(
        config.history_backend,
        config.max_history_length,
        sqlite_path=config.sqlite_path,
        redis_url=config.redis_url,
        sqlite_synchronous=config.sqlite_synchronous,
        retention_s=config.dedupe_retention_hours * 3600,
    )
    local_recall, local_rank = backends or (None, None)
    recall, rank, channels = open_backends(
        config, registry, recall=local_recall is None, rank=local_rank is None
    )
    recall = recall if local_recall is None else local_recall
    rank = rank if local_rank is None else local_rank
    pipeline = Pipeline(
        recall=recall,
        rank=rank,
        history_store=history_store,
        metrics=GatewayMetrics(registry),
        max_history_length=config.max_history_length,
        fallback_depth=scenarios.current.popular_cache_size,
    )
    servicer = GatewayServicer(
        scenarios=lambda: scenarios.current,
        pipeline=pipeline,
        history_store=history_store,
        registry=registry,
        max_in_flight=config.max_in_flight,
        default_deadline_s=config.default_deadline_ms / 1000,
    )

    async def refresh_catalog_forever() -> None:
        """Check recall's catalog every ``popular_cache.refresh_s`` (sooner while none is held)."""
        while True:
            interval = scenarios.current.popular_refresh_s
            await asyncio.sleep(interval if pipeline.catalog is not None else min(interval, CATALOG_RETRY_S))
            pipeline.fallback_depth = scenarios.current.popular_cache_size
            await pipeline.refresh_catalog()

    async def warmup() -> None:
        await history_store.ping()
        if not await pipeline.refresh_catalog(CATALOG_TIMEOUT_S):
            log.warning("recall unreachable at start: requests are UNAVAILABLE until it serves the catalog")
        await connect_channels(channels, CATALOG_TIMEOUT_S)

    def register(server: grpc.aio.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        return [GATEWAY_SERVICE]

    if config.max_in_flight >= config.serving.max_concurrent_rpcs:
        log.warning(  # gRPC then refuses calls before the in-flight limit can shed (and count) them
            "max_in_flight %d >= max_concurrent_rpcs %d: overload is refused uncounted",
            config.max_in_flight,
            config.serving.max_concurrent_rpcs,
        )
    bundle_info(registry, "gateway", "scenarios", scenarios.current.digest)
    auth = auth_interceptor(config)
    http_socket = None
    try:
        if config.http_enabled:  # bound first: a taken port fails the start before gRPC binds
            http_socket = bind_socket(config.serving.host, config.http_port)
        running = await start_server(
            config.serving,
            service="gateway",
            register=register,
            warmup=warmup,
            registry=registry,
            interceptors=[auth] if auth is not None else [],
            grow_receive_window=False,  # untrusted callers, kilobyte requests: see start_server
        )
    except BaseException:
        if http_socket is not None:
            http_socket.close()
        for channel in channels:
            await channel.close()
        await history_store.close()
        raise
    tasks = [asyncio.ensure_future(scenarios.watch()), asyncio.ensure_future(refresh_catalog_forever())]
    gateway = GatewayServer(running, servicer, scenarios, channels, history_store, tasks)
    if http_socket is not None:
        try:
            gateway.http = start_http(config, gateway, auth, http_socket)
            await gateway.http.wait_started()
        except BaseException:
            http_socket.close()
            await gateway.stop(0)
            raise
        log.info("HTTP/JSON API and console serving", extra={"http_port": gateway.http.port})
    return gateway


def start_http(
    config: GatewayConfig,
    gateway: GatewayServer,
    auth: BearerAuthInterceptor | None,
    sock: socket.socket,
) -> HttpServer:
    """Start the HTTP/JSON API and console on ``sock``, over the gateway's own servicer."""
    serving = config.serving
    api = HttpApi(
        servicer=gateway.servicer,
        auth=auth,
        health=gateway.running.health,
        max_body_bytes=serving.max_message_bytes,
        metrics_port=gateway.running.metrics_port,
    )
    tls = (serving.tls_cert, serving.tls_key, serving.tls_client_ca) if serving.tls_enabled else None
    http = HttpServer(
        api.app(gateway.running.registry),
        sock,
        max_connections=serving.max_concurrent_rpcs,
        grace_seconds=serving.grace_seconds,
        tls=tls,  # type: ignore[arg-type]  # tls_enabled: cert and key are set
    )
    http.start()
    return http


async def connect_channels(channels: list[grpc.aio.Channel], timeout_s: float) -> int:
    """Connect the downstream channels before the gateway reports ready (a channel connects on
    its first call otherwise, inside the first request's deadline), and say at start which did
    not. Waits until each channel is connected or has failed to (a refused or unresolvable address
    returns at once), at most ``timeout_s``; one not connected is logged, not fatal: calls to it
    fail over to the scenario's fallbacks while it keeps reconnecting. Returns how many are
    connected."""

    async def settle(channel: grpc.aio.Channel) -> None:
        state = channel.get_state(try_to_connect=True)
        while state in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING):
            await channel.wait_for_state_change(state)
            state = channel.get_state(try_to_connect=True)

    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*(settle(channel) for channel in channels))
    connected = sum(channel.get_state() is grpc.ChannelConnectivity.READY for channel in channels)
    if connected < len(channels):
        log.warning(
            "%d of %d downstream channels not connected at start", len(channels) - connected, len(channels)
        )
    return connected


def open_backends(
    config: GatewayConfig, registry: CollectorRegistry | None = None, recall: bool = True, rank: bool = True
) -> tuple[
    recall_pb2_grpc.RecallServiceStub | ShardedRecall | CoalescedStub | None,
    rank_pb2_grpc.RankServiceStub | CoalescedStub | None,
    list[grpc.aio.Channel],
]:
    """gRPC stubs for recall (a fan-out over its shards when sharded) and rank (TLS when
    configured) and the channels to close; None for a service not asked for (``recall`` /
    ``rank`` False: it runs in this process). With ``config.downstream_in_flight`` > 0 the
    unsharded Recall and Rank calls are coalesced into batch calls under load."""
    credentials = None
    if config.downstream_tls_ca is not None:
        serving = config.serving
        credentials = client_channel_credentials(config.downstream_tls_ca, serving.tls_cert, serving.tls_key)
    # The gateway's own limit (config.serving.max_message_bytes) guards against its public clients;
    # recall and rank are trusted and answer within their servers' default limit.
    max_bytes = DEFAULT_MAX_MESSAGE_BYTES
    # round_robin spreads calls over every pod behind a headless Service (dns:/// addresses);
    # the default pick_first would pin each gateway to one recall and one rank pod.
    balanced = (("grpc.lb_policy_name", "round_robin"),)
    channels: list[grpc.aio.Channel] = []
    rank_stub = recall_stub = None
    if rank:
        rank_channel = open_channel(
            config.rank_address, credentials=credentials, max_message_bytes=max_bytes, options=balanced
        )
        channels.append(rank_channel)
        rank_stub = batched(
            rank_pb2_grpc.RankServiceStub(rank_channel), "Rank", rank_pb2.RankBatchRequest, config, registry
        )
    if recall and config.recall_addresses:  # one channel per shard (each a StatefulSet pod), fanned out
        recall_channels = [
            open_channel(address, credentials=credentials, max_message_bytes=max_bytes)
            for address in config.recall_addresses
        ]
        channels.extend(recall_channels)
        recall_stub = ShardedRecall.connect(recall_channels, registry)
    elif recall:
        recall_channel = open_channel(
            config.recall_address, credentials=credentials, max_message_bytes=max_bytes, options=balanced
        )
        channels.append(recall_channel)
        recall_stub = batched(
            recall_pb2_grpc.RecallServiceStub(recall_channel),
            "Recall",
            recall_pb2.RecallBatchRequest,
            config,
            registry,
        )
    return recall_stub, rank_stub, channels


def batched(
    stub: Any,
    method: str,
    batch_request_type: type,
    config: GatewayConfig,
    registry: CollectorRegistry | None,
) -> Any:
    """``stub`` whose ``method`` goes out in ``<method>Batch`` calls under load (a
    :class:`CoalescedStub`), or ``stub`` itself with ``config.downstream_in_flight`` 0."""
    if config.downstream_in_flight <= 0:
        return stub
    service = method.lower()
    hold_ms = config.downstream_max_hold_ms
    return CoalescedStub(
        stub,
        method,
        f"{method}Batch",
        batch_request_type,
        config.downstream_in_flight,
        service=service,
        on_call=downstream_call_size(registry, service),
        max_hold_s=hold_ms / 1000.0 if hold_ms > 0 else None,
        on_release=downstream_releases(registry, service),
    )
