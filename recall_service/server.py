"""``serve(config)``: load the bundle, warm up one query, then serve RecallService; a new bundle
version at the bundle location is loaded, verified and warmed in the background and swapped in.
A sharded server (``config.recall_shards`` > 1) recalls from its own item range only; a share of
live u2i queries is checked against exact search in the background (``config.ann_quality_sample``)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from recall_service.ann_quality import AnnQualityMonitor
from recall_service.config import RecallConfig
from recall_service.engine import RecallEngine, RecallQuery
from recall_service.servicer import (
    RecallJob,
    RecallMetrics,
    RecallModel,
    RecallResult,
    RecallServicer,
    run_recall_jobs,
)
from recsys.serving.batching import BatcherMetrics, MicroBatcher
from recsys.serving.bootstrap import RunningServer, start_server
from recsys.serving.metrics import bundle_info, new_registry
from recsys.serving.reload import BundleKey, BundleWatcher, load_bundle
from recsys.v1 import recall_pb2, recall_pb2_grpc

SERVICE_NAME = recall_pb2.DESCRIPTOR.services_by_name["RecallService"].full_name


def build_servicer(
    engine: RecallEngine | RecallModel, config: RecallConfig, registry: CollectorRegistry
) -> RecallServicer:
    """The servicer over ``engine`` with its batcher, metrics and (when sampled) live ANN quality
    monitor (also used in-process, no gRPC)."""
    model = engine if isinstance(engine, RecallModel) else RecallModel(engine)
    metrics = RecallMetrics(registry)
    batcher_metrics = BatcherMetrics(registry, "recall")
    batcher: MicroBatcher[RecallJob, RecallResult] = MicroBatcher(
        run_recall_jobs,
        config.max_batch,
        config.max_wait_ms,
        on_batch=metrics.batch_size.observe,
        max_queue=config.max_queue,
        on_queue_wait=batcher_metrics.observe_queue_wait,
        on_reject=batcher_metrics.count_rejection,
        # every bundle is loaded with config.threads, so the first engine's pinning fits all
        thread_initializer=model.engine.pin_threads,
        thread_name="recall-batch",
    )
    ann_quality = None
    if config.ann_quality_sample > 0:
        ann_quality = AnnQualityMonitor(registry, config.ann_quality_sample, config.ann_quality_window)
    return RecallServicer(model, batcher, metrics, ann_quality)


async def warm_up(servicer: RecallServicer, model: RecallModel | None = None) -> None:
    """One real query through the batcher on ``model`` (default: the served one): user tower,
    index search, co-visitation, merge."""
    model = servicer.model if model is None else model
    history = model.engine.popularity.global_order[:3][::-1].astype(np.int64)
    query = RecallQuery(
        history=history,
        seed_items=history[-1:],
        k=10,
        quotas={"u2i": 4, "i2i": 2, "covisit": 2, "popular": 2},
    )
    await servicer.batcher.submit(RecallJob(model, query))


def bundle_watcher(
    servicer: RecallServicer, config: RecallConfig, registry: CollectorRegistry, served: BundleKey | None
) -> BundleWatcher[RecallModel]:
    """Watches ``config.bundle``: a new version is loaded, verified and warmed, then swapped in."""
    return BundleWatcher(
        config.bundle,
        "recall",
        load=lambda directory: load_model(directory, config),
        warm=lambda model: warm_up(servicer, model),
        swap=servicer.swap,
        registry=registry,
        poll_s=config.bundle_poll_s,
        served=served,
    )


def load_model(directory: Path, config: RecallConfig) -> RecallModel:
    """Load and verify the bundle in ``directory`` (blocking: called in a thread)."""
    return RecallModel(RecallEngine.load(directory, config.device, config.threads, config.shard))


async def load_servicer(config: RecallConfig, registry: CollectorRegistry) -> RecallServicer:
    """The servicer over ``config.bundle`` (a versions folder's ``current`` one), with its bundle
    watcher attached, not started (also used in-process, no gRPC)."""
    model, served = await load_bundle(config.bundle, lambda directory: load_model(directory, config))
    bundle_info(registry, "recall", "recall", model.version)
    servicer = build_servicer(model, config, registry)
    servicer.bundle_watcher = bundle_watcher(servicer, config, registry, served)
    return servicer


async def serve(config: RecallConfig, registry: CollectorRegistry | None = None) -> RunningServer:
    """Start the recall service; health turns SERVING after the bundle is loaded and warmed up,
    and stays SERVING through bundle swaps (``config.bundle_poll_s``)."""
    registry = new_registry() if registry is None else registry
    servicer = await load_servicer(config, registry)

    def register(server: grpc.aio.Server) -> list[str]:
        recall_pb2_grpc.add_RecallServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    running = await start_server(
        config.serving,
        service="recall",
        register=register,
        warmup=lambda: warm_up(servicer),
        registry=registry,
    )
    servicer.bundle_watcher.start(running)
    if servicer.ann_quality is not None:
        servicer.ann_quality.close_with(running)
    return running
