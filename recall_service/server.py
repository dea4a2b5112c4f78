"""``serve(config)``: load the bundle, warm up one query, then serve RecallService."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from prometheus_client import CollectorRegistry

from recall_service.config import RecallConfig
from recall_service.engine import CandidateList, RecallEngine, RecallQuery
from recall_service.servicer import RecallMetrics, RecallServicer
from recsys.serving.batching import BatcherMetrics, MicroBatcher
from recsys.serving.bootstrap import RunningServer, start_server
from recsys.serving.metrics import bundle_info, new_registry
from recsys.v1 import recall_pb2, recall_pb2_grpc

SERVICE_NAME = recall_pb2.DESCRIPTOR.services_by_name["RecallService"].full_name


def build_servicer(engine: RecallEngine, config: RecallConfig, registry: CollectorRegistry) -> RecallServicer:
    """The servicer over ``engine`` with its batcher and metrics (also used in-process, no gRPC)."""
    metrics = RecallMetrics(registry)
    batcher_metrics = BatcherMetrics(registry, "recall")
    batcher: MicroBatcher[RecallQuery, CandidateList] = MicroBatcher(
        engine.recall,
        config.max_batch,
        config.max_wait_ms,
        on_batch=metrics.batch_size.observe,
        max_queue=config.max_queue,
        on_queue_wait=batcher_metrics.observe_queue_wait,
        on_reject=batcher_metrics.count_rejection,
        thread_initializer=engine.pin_threads,
    )
    return RecallServicer(engine, batcher, metrics)


async def warm_up(servicer: RecallServicer) -> None:
    """One real query through the batcher: user tower, index search, co-visitation, merge."""
    engine = servicer.engine
    history = engine.popularity.global_order[:3][::-1].astype(np.int64)
    await servicer.batcher.submit(
        RecallQuery(
            history=history,
            seed_items=history[-1:],
            k=10,
            quotas={"u2i": 4, "i2i": 2, "covisit": 2, "popular": 2},
        )
    )


async def serve(config: RecallConfig, registry: CollectorRegistry | None = None) -> RunningServer:
    """Start the recall service; health turns SERVING after the bundle is loaded and warmed up."""
    registry = new_registry() if registry is None else registry
    engine = await asyncio.to_thread(RecallEngine.load, config.bundle, config.device, config.threads)
    bundle_info(registry, "recall", "recall", engine.version)
    servicer = build_servicer(engine, config, registry)

    def register(server: grpc.aio.Server) -> list[str]:
        recall_pb2_grpc.add_RecallServiceServicer_to_server(servicer, server)
        return [SERVICE_NAME]

    return await start_server(
        config.serving,
        service="recall",
        register=register,
        warmup=lambda: warm_up(servicer),
        registry=registry,
    )
