"""Live ANN quality: sampled u2i searches are checked against exact search off the request path
and exported as ``recsys_recall_live_ann_recall{k}``; an approximate index reads below 1, an
exact one 1.0, and the monitor follows the engine a hot swap serves."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from recall_service.ann_quality import AnnQualityMonitor
from recall_service.config import RecallConfig
from recall_service.engine import RecallEngine, RecallQuery
from recall_service.index import FaissSearcher, build_index, exact_neighbours
from recall_service.server import build_servicer, serve
from recall_service.servicer import RecallJob, RecallModel
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry
from recsys.serving.wire import INDEX, catalog_fingerprint, pack
from recsys.v1 import recall_pb2, recall_pb2_grpc

RECALL = "recsys_recall_live_ann_recall"
SAMPLES = "recsys_recall_live_ann_samples_total"


def random_catalog_engine(bundle: Path, factory: str, nprobe: int = 1, seed: int = 3) -> RecallEngine:
    """The tiny bundle's engine over random item vectors (where every ANN is visibly approximate,
    see TOOLING.md) indexed by ``factory``."""
    engine = RecallEngine.load(bundle, "cpu", 1)
    shape = engine.item_vectors.shape
    engine.item_vectors = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    engine.searcher = FaissSearcher(build_index(engine.item_vectors, factory), nprobe=nprobe)
    return engine


def u2i_queries(dataset, users: range, k: int = 100) -> list[RecallQuery]:
    return [
        RecallQuery(history=np.asarray(dataset.sequences[u][:6], dtype=np.int64), quotas={"u2i": k}, k=k)
        for u in users
    ]


def expected_recalls(engine: RecallEngine, queries: list[RecallQuery], k: int) -> list[float]:
    """Recall@k of the engine's index against brute force per query, computed here independently
    (``queries`` as one batch, as the engine ran them: the same user vectors)."""
    vectors = engine._user_vectors(queries)
    found = engine.searcher.search(vectors, k)[1]
    truth = exact_neighbours(engine.item_vectors, vectors, k)
    return [np.intersect1d(f, t).size / k for f, t in zip(found, truth, strict=True)]


def eventually(condition, timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds (a background thread's work); False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def value(registry, name: str, k: int | None = None) -> float | None:
    return registry.get_sample_value(name, {"k": str(k)} if k is not None else {})


def test_an_ivf_index_with_low_nprobe_reads_below_one(recall_bundle: Path, synthetic_dataset) -> None:
    engine = random_catalog_engine(recall_bundle, "IVF4,Flat", nprobe=1)
    registry = new_registry(process_metrics=False)
    monitor = AnnQualityMonitor(registry, sample_rate=1.0, window=200, seed=0)
    monitor.follow(engine)
    queries = u2i_queries(synthetic_dataset, range(40))
    try:
        engine.recall(queries[:20])
        engine.recall(queries[20:])  # two batches, one exact check per sample
        assert monitor.wait_idle()
    finally:
        monitor.close()
    assert value(registry, SAMPLES) == len(queries)
    for k in (10, 100):
        live = value(registry, RECALL, k)
        assert live is not None and live < 0.9
        expected = expected_recalls(engine, queries[:20], k) + expected_recalls(engine, queries[20:], k)
        assert live == pytest.approx(np.mean(expected), abs=1e-9)


def test_an_exact_index_reads_one(
    recall_engine: RecallEngine, recall_bundle: Path, synthetic_dataset
) -> None:
    assert recall_engine.searcher.description.startswith("faiss IndexIDMap2")  # Flat
    engine = RecallEngine.load(recall_bundle, "cpu", 1)
    shard = RecallEngine.load(recall_bundle, "cpu", 1, shard=(1, 3))  # exact within its own range
    for exact in (engine, shard):
        registry = new_registry(process_metrics=False)
        monitor = AnnQualityMonitor(registry, sample_rate=1.0, seed=0)
        monitor.follow(exact)
        try:
            exact.recall(u2i_queries(synthetic_dataset, range(10), k=60))
            assert monitor.wait_idle()
        finally:
            monitor.close()
        assert value(registry, SAMPLES) == 10
        assert value(registry, RECALL, 10) == 1.0
        assert value(registry, RECALL, 100) is None  # the searches went 60 + slack deep, not 100


def test_a_full_queue_drops_samples_without_blocking(recall_bundle: Path, synthetic_dataset) -> None:
    engine = RecallEngine.load(recall_bundle, "cpu", 1)
    registry = new_registry(process_metrics=False)
    monitor = AnnQualityMonitor(registry, sample_rate=1.0, queue_size=2, seed=0)
    monitor._start = lambda: None  # no worker: the queue only fills
    monitor.follow(engine)
    engine.recall(u2i_queries(synthetic_dataset, range(5), k=20))
    assert value(registry, "recsys_recall_live_ann_dropped_total") == 3
    monitor.close()


def test_sampling_is_a_share_and_zero_turns_it_off(recall_bundle: Path, synthetic_dataset) -> None:
    engine = RecallEngine.load(recall_bundle, "cpu", 1)
    registry = new_registry(process_metrics=False)
    monitor = AnnQualityMonitor(registry, sample_rate=0.25, seed=1)
    monitor.follow(engine)
    try:
        engine.recall(u2i_queries(synthetic_dataset, range(200), k=20))
        assert monitor.wait_idle()
    finally:
        monitor.close()
    assert 25 <= value(registry, SAMPLES) <= 75  # binomial(200, 0.25): 50 +- 5 sigma
    config = RecallConfig(serving=ServingConfig(), bundle=recall_bundle, ann_quality_sample=0.0)
    assert build_servicer(engine, config, new_registry(process_metrics=False)).ann_quality is None
    with pytest.raises(ValueError, match="sample_rate"):
        AnnQualityMonitor(registry, sample_rate=0.0)


async def test_the_monitor_follows_a_hot_swap(recall_bundle: Path, synthetic_dataset) -> None:
    approximate = random_catalog_engine(recall_bundle, "IVF4,Flat", nprobe=1)
    exact = random_catalog_engine(recall_bundle, "Flat")
    config = RecallConfig(serving=ServingConfig(), bundle=recall_bundle, ann_quality_sample=1.0)
    registry = new_registry(process_metrics=False)
    servicer = build_servicer(approximate, config, registry)
    monitor = servicer.ann_quality
    try:
        for query in u2i_queries(synthetic_dataset, range(10)):
            await servicer.batcher.submit(RecallJob(servicer.model, query))
        assert monitor.wait_idle()
        assert value(registry, RECALL, 10) < 0.9

        old_model = servicer.model
        servicer.swap(RecallModel(exact))
        assert approximate.ann_sampler is None and exact.ann_sampler is monitor
        for query in u2i_queries(synthetic_dataset, range(10, 20)):
            await servicer.batcher.submit(RecallJob(old_model, query))  # in flight on the old bundle
            await servicer.batcher.submit(RecallJob(servicer.model, query))
        assert monitor.wait_idle()
        assert value(registry, SAMPLES) == 20  # the old bundle's late queries were not sampled
        assert value(registry, RECALL, 10) == 1.0  # the window restarted with the new bundle
    finally:
        monitor.close()
        servicer.batcher.close()


@pytest.mark.integration
async def test_the_server_exports_the_gauge(recall_bundle: Path, recall_engine, synthetic_dataset) -> None:
    config = RecallConfig(
        serving=ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0.5),
        bundle=recall_bundle,
        device="cpu",
        threads=1,
        bundle_poll_s=0,
        ann_quality_sample=1.0,
    )
    running = await serve(config, registry=new_registry(process_metrics=False))
    try:
        async with grpc.aio.insecure_channel(running.address) as channel:
            stub = recall_pb2_grpc.RecallServiceStub(channel)
            for query in u2i_queries(synthetic_dataset, range(5), k=20):
                await stub.Recall(
                    recall_pb2.RecallRequest(
                        scenario="home",
                        catalog=catalog_fingerprint(recall_engine.items.ids),
                        history_items=pack(query.history, INDEX),
                        sources=[recall_pb2.SourceQuota(source="u2i", k=20)],
                        k=20,
                    ),
                    timeout=10,
                )
        # the warm-up query and the 5 calls, checked in the background
        assert eventually(lambda: value(running.registry, SAMPLES) == 6)
        assert value(running.registry, RECALL, 10) == 1.0
    finally:
        await running.stop(grace=0)
