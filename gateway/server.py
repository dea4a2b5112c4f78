"""Start the gateway: downstream channels, history store, scenario registry, servicer, bootstrap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from gateway.config import GatewayConfig
from gateway.history import HistoryStore, open_history_store
from gateway.pipeline import GatewayMetrics, Pipeline, PopularCache
from gateway.scenarios import ScenarioRegistry
from gateway.servicer import GatewayServicer
from recsys.serving.bootstrap import RunningServer, client_channel_credentials, open_channel, start_server
from recsys.serving.metrics import bundle_info, new_registry
from recsys.v1 import gateway_pb2, gateway_pb2_grpc, rank_pb2_grpc, recall_pb2_grpc

log = logging.getLogger(__name__)

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
POPULAR_REFRESH_TIMEOUT_S = 5.0
POPULAR_RETRY_S = 5.0  # refresh retry interval while the popular table is still empty


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
    ):
        self.running = running
        self.servicer = servicer
        self.scenarios = scenarios
        self._channels = channels
        self._history_store = history_store
        self._tasks = tasks
        self._closed = False

    def __getattr__(self, name: str) -> Any:  # port, metrics_port, registry, address, server, ...
        return getattr(self.running, name)

    def reload_scenarios(self) -> bool:
        """Reload the scenario file now (SIGHUP); False when the new file was rejected."""
        return self.scenarios.reload()

    async def stop(self, grace: float | None = None) -> None:
        """Stop serving (in-flight calls get ``grace``), then close channels and the store."""
        await self.running.stop(grace)
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for channel in self._channels:
            await channel.close()
        await self._history_store.close()


async def serve(config: GatewayConfig, registry: CollectorRegistry | None = None) -> GatewayServer:
    """Start the gateway; returns once it is SERVING (its popular table filled when recall is up)."""
    registry = new_registry() if registry is None else registry
    scenarios = ScenarioRegistry(
        config.scenarios_path,
        config.reload_interval_s,
        on_reload=lambda current: bundle_info(registry, "gateway", "scenarios", current.digest),
    )
    history_store = open_history_store(
        config.history_backend,
        config.max_history_length,
        sqlite_path=config.sqlite_path,
        redis_url=config.redis_url,
    )
    credentials = None
    if config.downstream_tls_ca is not None:
        serving = config.serving
        credentials = client_channel_credentials(config.downstream_tls_ca, serving.tls_cert, serving.tls_key)
    max_bytes = config.serving.max_message_bytes
    # round_robin spreads calls over every pod behind a headless Service (dns:/// addresses);
    # the default pick_first would pin each gateway to one recall and one rank pod.
    balanced = (("grpc.lb_policy_name", "round_robin"),)
    recall_channel = open_channel(
        config.recall_address, credentials=credentials, max_message_bytes=max_bytes, options=balanced
    )
    rank_channel = open_channel(
        config.rank_address, credentials=credentials, max_message_bytes=max_bytes, options=balanced
    )
    recall = recall_pb2_grpc.RecallServiceStub(recall_channel)
    popular_cache = PopularCache(scenarios.current.popular_cache_size)
    pipeline = Pipeline(
        recall=recall,
        rank=rank_pb2_grpc.RankServiceStub(rank_channel),
        history_store=history_store,
        popular_cache=popular_cache,
        metrics=GatewayMetrics(registry),
        max_history_length=config.max_history_length,
    )
    servicer = GatewayServicer(
        scenarios=lambda: scenarios.current,
        pipeline=pipeline,
        history_store=history_store,
        registry=registry,
        max_in_flight=config.max_in_flight,
        default_deadline_s=config.default_deadline_ms / 1000,
    )

    async def refresh_popular() -> bool:
        current = scenarios.current
        popular_cache.size = current.popular_cache_size
        model_scenario = next(iter(current.scenarios.values())).model_scenario_name
        try:
            await popular_cache.refresh(recall, model_scenario, POPULAR_REFRESH_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            log.warning("popular table refresh failed: %s %s", error.code().name, error.details())
            return False
        return True

    async def refresh_popular_forever() -> None:
        while True:
            interval = scenarios.current.popular_refresh_s
            await asyncio.sleep(interval if popular_cache.candidates else min(interval, POPULAR_RETRY_S))
            await refresh_popular()

    async def warmup() -> None:
        await history_store.ping()
        if not await refresh_popular():
            log.warning("recall unreachable at start: serving without a popular fallback until it answers")

    def register(server: grpc.aio.Server) -> list[str]:
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        return [GATEWAY_SERVICE]

    bundle_info(registry, "gateway", "scenarios", scenarios.current.digest)
    try:
        running = await start_server(
            config.serving, service="gateway", register=register, warmup=warmup, registry=registry
        )
    except BaseException:
        await recall_channel.close()
        await rank_channel.close()
        await history_store.close()
        raise
    tasks = [asyncio.ensure_future(scenarios.watch()), asyncio.ensure_future(refresh_popular_forever())]
    return GatewayServer(running, servicer, scenarios, [recall_channel, rank_channel], history_store, tasks)
