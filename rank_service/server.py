"""`serve(config)`: load the rank bundle, start the shared bootstrap with the Rank servicer."""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from rank_service.config import RankConfig
from rank_service.runtime import RankQuery, RankRuntime
from rank_service.servicer import RankServicer, ScoreJob, service_name
from recsys.serving.bootstrap import RunningServer, start_server
from recsys.serving.metrics import bundle_info, new_registry
from recsys.v1 import rank_pb2_grpc

log = logging.getLogger(__name__)


async def serve(config: RankConfig, registry: CollectorRegistry | None = None) -> RunningServer:
    """Load and warm the runtime, then start the server; health is SERVING once a request has
    gone through the micro-batcher (the same path as a real call)."""
    registry = new_registry() if registry is None else registry
    runtime = await asyncio.to_thread(RankRuntime.load, config.bundle, config.device, config.threads)
    servicer = RankServicer(runtime, registry, config.max_batch, config.max_wait_ms, config.max_queue)
    bundle_info(registry, "rank", "rank", runtime.version)

    def register(server: grpc.aio.Server) -> list[str]:
        rank_pb2_grpc.add_RankServiceServicer_to_server(servicer, server)
        return [service_name()]

    log.info("rank runtime ready: %s on %s", runtime.version, runtime.provider)
    return await start_server(
        config.serving, service="rank", register=register, warmup=lambda: warm_up(servicer), registry=registry
    )


async def warm_up(servicer: RankServicer) -> None:
    """One request through the micro-batcher: the same path as a real call."""
    runtime = servicer.runtime
    history = np.arange(min(len(runtime.items), runtime.max_history), dtype=np.int64)
    query = RankQuery.without_recall(history, 0, np.arange(min(len(runtime.items), 100)))
    scores, _ = await servicer.batcher.submit(ScoreJob(query, debug=False))
    if not np.isfinite(scores).all():
        raise RuntimeError("rank warm-up produced non-finite scores")
