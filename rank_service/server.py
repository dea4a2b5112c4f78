"""`serve(config)`: load the rank bundle, start the shared bootstrap with the Rank servicer; a new
bundle version at the bundle location is loaded, verified and warmed in the background and
swapped in."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from rank_service.config import RankConfig
from rank_service.runtime import RankQuery, RankRuntime
from rank_service.servicer import RankModel, RankServicer, ScoreJob, service_name
from recsys.serving.bootstrap import RunningServer, start_server
from recsys.serving.metrics import bundle_info, new_registry
from recsys.serving.reload import BundleKey, BundleWatcher, load_bundle
from recsys.v1 import rank_pb2_grpc

log = logging.getLogger(__name__)


def load_model(directory: Path, config: RankConfig) -> RankModel:
    """Load, verify and warm (one session run) the bundle in ``directory`` (blocking: in a thread)."""
    return RankModel(RankRuntime.load(directory, config.device, config.threads))


def bundle_watcher(
    servicer: RankServicer, config: RankConfig, registry: CollectorRegistry, served: BundleKey | None
) -> BundleWatcher[RankModel]:
    """Watches ``config.bundle``: a new version is loaded, verified and warmed, then swapped in."""
    return BundleWatcher(
        config.bundle,
        "rank",
        load=lambda directory: load_model(directory, config),
        warm=lambda model: warm_up(servicer, model),
        swap=servicer.swap,
        registry=registry,
        poll_s=config.bundle_poll_s,
        served=served,
    )


async def load_servicer(config: RankConfig, registry: CollectorRegistry) -> RankServicer:
    """The servicer over ``config.bundle`` (a versions folder's ``current`` one), with its bundle
    watcher attached, not started (also used in-process, no gRPC)."""
    model, served = await load_bundle(config.bundle, lambda directory: load_model(directory, config))
    servicer = RankServicer(model, registry, config.max_batch, config.max_wait_ms, config.max_queue)
    bundle_info(registry, "rank", "rank", model.version)
    servicer.bundle_watcher = bundle_watcher(servicer, config, registry, served)
    return servicer


async def serve(config: RankConfig, registry: CollectorRegistry | None = None) -> RunningServer:
    """Load and warm the runtime, then start the server; health is SERVING once a request has
    gone through the micro-batcher (the same path as a real call), and stays SERVING through
    bundle swaps (``config.bundle_poll_s``)."""
    registry = new_registry() if registry is None else registry
    servicer = await load_servicer(config, registry)
    model = servicer.model

    def register(server: grpc.aio.Server) -> list[str]:
        rank_pb2_grpc.add_RankServiceServicer_to_server(servicer, server)
        return [service_name()]

    log.info("rank runtime ready: %s on %s", model.version, model.runtime.provider)
    running = await start_server(
        config.serving, service="rank", register=register, warmup=lambda: warm_up(servicer), registry=registry
    )
    servicer.bundle_watcher.start(running)
    return running


async def warm_up(servicer: RankServicer, model: RankModel | None = None) -> None:
    """One request through the micro-batcher on ``model`` (default: the served one): the same path
    as a real call."""
    model = servicer.model if model is None else model
    runtime = model.runtime
    history = np.arange(min(len(runtime.items), runtime.max_history), dtype=np.int64)
    query = RankQuery.without_recall(history, 0, np.arange(min(len(runtime.items), 100)))
    scores, _ = await servicer.batcher.submit(ScoreJob(query, debug=False, model=model))
    if not np.isfinite(scores).all():
        raise RuntimeError("rank warm-up produced non-finite scores")
