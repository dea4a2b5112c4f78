"""Sharded recall: shards own disjoint item ranges, the gateway's fan-out merges them.

Three shards of the tiny bundle (an exact Flat index) merged by ``recsys.recall_merge`` answer
exactly what the unsharded engine answers, in process and through real servers on loopback
behind ``gateway.recall_fanout.ShardedRecall``; a shard down degrades, all down fails.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pytest

from gateway.recall_fanout import SHARD_UNAVAILABLE, ShardedRecall
from recall_service.config import RecallConfig, from_args
from recall_service.engine import RecallEngine, RecallQuery
from recall_service.index import FaissSearcher, build_index, restrict_to_range
from recall_service.server import serve
from recsys.recall_merge import CandidateList, SourceList, combine_lists, merge_shards, shard_range
from recsys.serving.config import ConfigError, ServingConfig
from recsys.serving.metrics import new_registry
from recsys.serving.wire import FLAGS, INDEX, SCORE, catalog_fingerprint, flags_to_mask, pack, unpack
from recsys.sources import RECALL_SOURCES
from recsys.v1 import recall_pb2, recall_pb2_grpc

SHARDS = 3


@pytest.fixture(scope="module")
def shard_engines(recall_bundle: Path) -> list[RecallEngine]:
    return [RecallEngine.load(recall_bundle, "cpu", 1, shard=(i, SHARDS)) for i in range(SHARDS)]


def queries(engine: RecallEngine, dataset) -> list[RecallQuery]:
    """Each source alone and the scenarios' mixes: users with histories, seeds, filters, cold start."""
    category = int(np.bincount(engine.item_category[engine.item_category >= 0]).argmax())
    found = []
    for user in (0, 3, 7):
        history = np.asarray(dataset.sequences[user][:8], dtype=np.int64)
        seeds = history[-1:]
        for scenario in range(len(engine.scenarios)):
            found.append(RecallQuery(history=history, scenario=scenario, seed_items=seeds, k=40))
        for source in ("u2i", "i2i", "covisit", "popular"):
            found.append(RecallQuery(history=history, seed_items=seeds, quotas={source: 0}, k=30))
        found += [
            RecallQuery(history=history, quotas={"u2i": 20, "covisit": 10, "popular": 5}, k=30),
            RecallQuery(history=history, quotas={"u2i": 10, "i2i": 10}, category=category, k=25),
            RecallQuery(history=history, seed_items=seeds, quotas={"i2i": 15, "covisit": 15}, k=20),
            RecallQuery(history=history, exclude_history=False, exclude_items=seeds, k=30),
            RecallQuery(history=history, quotas={"u2i": 10, "popular": 10}, sponsored_only=True, k=15),
        ]
    found.append(RecallQuery(history=np.zeros(0, np.int64), k=20))  # cold start: popular only
    return found


def assert_same(got: CandidateList, want: CandidateList) -> None:
    assert got.items.tolist() == want.items.tolist()
    assert got.source_ids.tolist() == want.source_ids.tolist()
    assert np.array_equal(got.source_mask, want.source_mask)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.source_scores, want.source_scores, rtol=1e-5, atol=1e-6)


def test_shards_own_disjoint_ranges_covering_the_catalog() -> None:
    for num_items in (0, 1, 7, 100, 1001):
        ranges = [shard_range(i, SHARDS, num_items) for i in range(SHARDS)]
        assert ranges[0][0] == 0 and ranges[-1][1] == num_items
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(SHARDS - 1))


def test_shard_lists_combine_by_score_then_popularity_rank() -> None:
    first = SourceList(np.array([5, 1]), np.array([0.9, 0.5], np.float32), np.array([7, 2], np.int32))
    second = SourceList(np.array([30, 20]), np.array([0.9, 0.5], np.float32), np.array([3, 9], np.int32))
    combined = combine_lists([first, second], limit=3)
    assert combined.items.tolist() == [30, 5, 1]  # 0.9 tie: rank 3 before 7; 0.5 tie: 2 before 9
    assert combined.ranks.tolist() == [3, 7, 2]


@pytest.mark.parametrize("factory", ["Flat", "IVF8,Flat", "HNSW8"])
def test_a_restricted_searcher_answers_the_full_one_filtered_to_its_range(factory: str) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((600, 8)).astype(np.float32)
    full = FaissSearcher(build_index(vectors, factory), nprobe=8, ef_search=64)
    shard = restrict_to_range(full, vectors, 200, 400)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    scores, ids = shard.search(queries, 10)
    want_scores, want_ids = full.search(queries, 10, np.arange(200, 400))
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6)
    if factory == "Flat":  # an exact index is rebuilt over the slice: a shard holds 1/count of it
        assert shard.cpu_index.ntotal == 200
    allowed = np.arange(250, 300)
    assert set(shard.search(queries, 10, allowed)[1].ravel().tolist()) <= {-1, *allowed.tolist()}


def test_a_shard_recalls_only_its_own_items(shard_engines, synthetic_dataset) -> None:
    for engine in shard_engines:
        start, end = engine.item_range
        for query in queries(engine, synthetic_dataset)[:12]:
            for found in engine.source_lists([query])[0].lists.values():
                assert ((found.items >= start) & (found.items < end)).all()


def test_merged_shards_equal_the_unsharded_engine(recall_engine, shard_engines, synthetic_dataset) -> None:
    assert recall_engine.searcher.description.startswith("faiss IndexIDMap2")  # exact (Flat)
    batch = queries(recall_engine, synthetic_dataset)
    shard_lists = [engine.source_lists(batch) for engine in shard_engines]
    for position, want in enumerate(recall_engine.recall(batch)):
        assert_same(merge_shards([lists[position] for lists in shard_lists]), want)


def test_shard_settings_from_env_flags_and_pod_ordinal(recall_bundle: Path, monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_BUNDLE", str(recall_bundle))
    monkeypatch.setenv("HOSTNAME", "recsys-recall-2")
    assert from_args([]).shard is None  # unsharded: the hostname's ordinal is ignored
    monkeypatch.setenv("RECSYS_RECALL_SHARDS", "3")
    assert from_args([]).shard == (2, 3)
    monkeypatch.setenv("RECSYS_RECALL_SHARD_INDEX", "1")
    assert from_args([]).shard == (1, 3)
    assert from_args(["--recall-shard-index", "0"]).shard == (0, 3)
    monkeypatch.delenv("RECSYS_RECALL_SHARD_INDEX")
    monkeypatch.setenv("HOSTNAME", "laptop")
    with pytest.raises(ConfigError, match=r"^recall_shard_index:"):
        from_args([])
    with pytest.raises(ConfigError, match=r"^recall_shard_index:"):
        from_args(["--recall-shard-index", "3"])


# ---------------------------------------------------------------------- through real servers


def to_request(query: RecallQuery, engine: RecallEngine, catalog: str) -> recall_pb2.RecallRequest:
    filters = recall_pb2.RecallFilters(
        exclude_history=query.exclude_history,
        exclude_items=pack(query.exclude_items, INDEX),
        category=engine.category_names[query.category] if query.category >= 0 else "",
        sponsored_only=query.sponsored_only,
    )
    return recall_pb2.RecallRequest(
        scenario=engine.scenarios[query.scenario],
        catalog=catalog,
        history_items=pack(query.history, INDEX),
        seed_items=pack(query.seed_items, INDEX),
        sources=[recall_pb2.SourceQuota(source=s, k=k) for s, k in query.quotas.items()],
        k=query.k,
        filters=filters,
    )


def decoded(response: recall_pb2.RecallResponse) -> CandidateList:
    assert list(response.source_names) == list(RECALL_SOURCES)
    items = unpack(response.items, INDEX, "items")
    return CandidateList(
        items=items.astype(np.int64),
        scores=unpack(response.scores, SCORE, "scores", len(items)),
        source_ids=unpack(response.sources, FLAGS, "sources", len(items)),
        source_scores=unpack(response.source_scores, SCORE, "source_scores").reshape(len(items), -1),
        source_mask=flags_to_mask(unpack(response.source_flags, FLAGS, "source_flags"), len(RECALL_SOURCES)),
    )


def recall_config(bundle: Path, **fields) -> RecallConfig:
    serving = ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0.5)
    return RecallConfig(serving=serving, bundle=bundle, device="cpu", threads=1, bundle_poll_s=0, **fields)


@pytest.mark.integration
async def test_fan_out_over_three_shard_servers(
    recall_bundle: Path, recall_engine, shard_engines, synthetic_dataset
) -> None:
    base = recall_config(recall_bundle)
    unsharded = await serve(base, registry=new_registry(process_metrics=False))
    shards = [
        await serve(
            dataclasses.replace(base, recall_shards=SHARDS, recall_shard_index=i),
            registry=new_registry(process_metrics=False),
        )
        for i in range(SHARDS)
    ]
    channels = [grpc.aio.insecure_channel(server.address) for server in [unsharded, *shards]]
    try:
        direct = recall_pb2_grpc.RecallServiceStub(channels[0])
        registry = new_registry(process_metrics=False)
        fan_out = ShardedRecall.connect(channels[1:], registry)
        catalog = catalog_fingerprint(recall_engine.items.ids)

        chunks = [chunk async for chunk in fan_out.GetCatalog(recall_pb2.CatalogRequest(), timeout=10)]
        assert chunks[0].catalog == catalog  # every shard serves the whole catalog
        assert sum(len(chunk.item_ids) for chunk in chunks) == recall_engine.num_items

        batch = queries(recall_engine, synthetic_dataset)
        for query in batch:
            request = to_request(query, recall_engine, catalog)
            want = await direct.Recall(request, timeout=10)
            got = await fan_out.Recall(request, timeout=10)
            assert list(got.degraded_reasons) == []
            assert got.model_version == want.model_version
            assert_same(decoded(got), decoded(want))

        await shards[1].stop(grace=0)  # one shard down: the other two, marked degraded
        for query in batch[:6]:
            got = await fan_out.Recall(to_request(query, recall_engine, catalog), timeout=10)
            assert list(got.degraded_reasons) == [SHARD_UNAVAILABLE]
            lists = [shard_engines[i].source_lists([query])[0] for i in (0, 2)]
            assert_same(decoded(got), merge_shards(lists))
        assert registry.get_sample_value(
            "recsys_recall_shard_failures_total", {"shard": "1", "code": "UNAVAILABLE"}
        ) == pytest.approx(6)
        chunks = [chunk async for chunk in fan_out.GetCatalog(recall_pb2.CatalogRequest(), timeout=10)]
        assert chunks[0].catalog == catalog

        await shards[0].stop(grace=0)
        await shards[2].stop(grace=0)  # all down: the error a recall stub raises (popular fallback)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await fan_out.Recall(to_request(batch[0], recall_engine, catalog), timeout=10)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        for channel in channels:
            await channel.close()
        for server in [unsharded, *shards]:
            await server.stop(grace=0)
