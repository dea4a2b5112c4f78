"""Integration: the real recall server on port 0 over the tiny bundle, called through gRPC."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recall_service.config import RecallConfig
from recall_service.server import serve
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry
from recsys.v1 import common_pb2, recall_pb2, recall_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
async def server(recall_bundle: Path):
    config = RecallConfig(
        serving=ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=1.0),
        bundle=recall_bundle,
        device="cpu",
        max_batch=16,
        max_wait_ms=20.0,
        threads=1,
    )
    running = await serve(config, registry=new_registry(process_metrics=False))
    async with grpc.aio.insecure_channel(running.address) as channel:
        yield running, recall_pb2_grpc.RecallServiceStub(channel), channel
    await running.stop(grace=0)


def history(dataset, user: int, length: int = 6) -> list[common_pb2.HistoryItem]:
    items = dataset.items.external_many(dataset.sequences[user][:length])
    return [common_pb2.HistoryItem(item_id=item, type=common_pb2.VIEW) for item in items]


def request(**fields) -> recall_pb2.RecallRequest:
    fields.setdefault("scenario", "home")
    fields.setdefault("k", 20)
    return recall_pb2.RecallRequest(**fields)


def metric(running, name: str, labels: dict | None = None) -> float:
    return running.registry.get_sample_value(name, labels or {}) or 0.0


async def test_health_is_serving_after_warmup(server) -> None:
    running, _, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="recsys.v1.RecallService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert metric(running, "recsys_recall_batch_size_count") >= 1  # the warm-up query ran


async def test_u2i_candidates(server, synthetic_dataset) -> None:
    _, stub, _ = server
    seen = history(synthetic_dataset, 0)
    reply = await stub.Recall(
        request(
            history=seen,
            sources=[recall_pb2.SourceQuota(source="u2i", k=20)],
            filters=recall_pb2.RecallFilters(exclude_history=True),
        )
    )
    ids = [c.item_id for c in reply.candidates]
    assert len(ids) == 20 and len(set(ids)) == 20
    assert not set(ids) & {h.item_id for h in seen}
    assert {c.source for c in reply.candidates} == {"u2i"}
    assert all(c.source_scores["u2i"] == pytest.approx(c.score) for c in reply.candidates)
    assert reply.model_version.startswith("recall-")
    assert all(c.category for c in reply.candidates)  # catalog attributes for the re-rank rules


async def test_i2i_and_covisit_for_an_item_page(server, synthetic_dataset) -> None:
    _, stub, _ = server
    viewed = synthetic_dataset.items.external(int(synthetic_dataset.sequences[5][0]))
    reply = await stub.Recall(
        request(
            scenario="item_detail",
            seed_item_ids=[viewed],
            sources=[
                recall_pb2.SourceQuota(source="i2i", k=10),
                recall_pb2.SourceQuota(source="covisit", k=10),
            ],
            filters=recall_pb2.RecallFilters(exclude_item_ids=[viewed]),
        )
    )
    ids = [c.item_id for c in reply.candidates]
    assert viewed not in ids and len(ids) == 20
    assert {"i2i", "covisit"} <= {c.source for c in reply.candidates}


async def test_popular_and_filters(server, synthetic_dataset) -> None:
    _, stub, _ = server
    popular = await stub.Recall(request(sources=[recall_pb2.SourceQuota(source="popular", k=10)], k=10))
    assert [c.source for c in popular.candidates] == ["popular"] * 10
    scores = [c.score for c in popular.candidates]
    assert scores == sorted(scores, reverse=True)
    category = synthetic_dataset.catalog.category_names[0]
    filtered = await stub.Recall(
        request(
            history=history(synthetic_dataset, 7),
            k=5,
            filters=recall_pb2.RecallFilters(category=category, exclude_history=True),
        )
    )
    assert len(filtered.candidates) == 5
    assert {c.category for c in filtered.candidates} == {category}
    sponsored = await stub.Recall(
        request(
            history=history(synthetic_dataset, 7), k=5, filters=recall_pb2.RecallFilters(sponsored_only=True)
        )
    )
    assert sponsored.candidates and all(c.bid > 0 for c in sponsored.candidates)
    excluded = [c.item_id for c in popular.candidates[:3]]
    rest = await stub.Recall(
        request(
            sources=[recall_pb2.SourceQuota(source="popular", k=10)],
            k=10,
            filters=recall_pb2.RecallFilters(exclude_item_ids=excluded),
        )
    )
    assert [c.item_id for c in rest.candidates][:7] == [c.item_id for c in popular.candidates[3:]]


async def test_cold_start_and_unknown_history_items(server) -> None:
    running, stub, _ = server
    cold = await stub.Recall(request(user_id="", sources=[recall_pb2.SourceQuota(source="u2i", k=10)], k=10))
    assert [c.source for c in cold.candidates] == ["popular"] * 10
    before = metric(running, "recsys_recall_unknown_history_items_total")
    unknown = [common_pb2.HistoryItem(item_id="no-such-item"), common_pb2.HistoryItem(item_id="nor-this")]
    reply = await stub.Recall(request(history=unknown, k=10))
    assert reply.unknown_history_items == 2 and len(reply.candidates) == 10
    assert metric(running, "recsys_recall_unknown_history_items_total") == before + 2


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": -3}, "k"),
        ({"k": 10_001}, "k"),
        ({"scenario": "checkout"}, "scenario"),
        ({"scenario": ""}, "scenario"),
        ({"sources": [recall_pb2.SourceQuota(source="graph", k=3)]}, "sources[0].source"),
        ({"sources": [recall_pb2.SourceQuota(source="u2i", k=-1)]}, "sources[0].k"),
        ({"history": [common_pb2.HistoryItem(item_id="x")] * 1001}, "history"),
        ({"filters": recall_pb2.RecallFilters(category="no-such-category")}, "filters.category"),
        ({"user_id": "has space"}, "user_id"),
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field(server, fields: dict, field: str) -> None:
    _, stub, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Recall(request(**fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")


async def test_concurrent_calls_are_micro_batched_and_answer_like_single_calls(
    server, synthetic_dataset
) -> None:
    running, stub, _ = server
    requests = [
        request(
            history=history(synthetic_dataset, user, 2 + user % 7),
            k=15,
            scenario=("home", "item_detail", "cart")[user % 3],
            seed_item_ids=[synthetic_dataset.items.external(user)] if user % 3 else [],
            filters=recall_pb2.RecallFilters(exclude_history=True),
        )
        for user in range(40)
    ]
    singles = [await stub.Recall(r) for r in requests]
    batches_before = metric(running, "recsys_recall_batch_size_count")
    together = await asyncio.gather(*(stub.Recall(r) for r in requests))
    batches = metric(running, "recsys_recall_batch_size_count") - batches_before
    assert batches < len(requests), "concurrent calls were not batched"
    for alone, batched in zip(singles, together, strict=True):
        assert [c.item_id for c in alone.candidates] == [c.item_id for c in batched.candidates]
        assert [c.source for c in alone.candidates] == [c.source for c in batched.candidates]
        for a, b in zip(alone.candidates, batched.candidates, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-5)


def test_serving_modules_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import recall_service, recall_service.server, recall_service.__main__, recall_service.evaluate\n"
        "import recall_service.bench\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
