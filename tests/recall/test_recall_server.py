"""Integration: the real recall server on port 0 over the tiny bundle, called through gRPC."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recall_service.config import RecallConfig
from recall_service.server import serve
from recsys.scenario.catalog import Catalog, fetch_catalog
from recsys.scenario.stages import decode_recall
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry
from recsys.serving.wire import INDEX, catalog_fingerprint, flags_to_mask, pack
from recsys.sources import RECALL_SOURCES
from recsys.v1 import recall_pb2, recall_pb2_grpc

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
        stub = recall_pb2_grpc.RecallServiceStub(channel)
        yield running, stub, channel, await fetch_catalog(stub, None, 10)
    await running.stop(grace=0)


def history(dataset, user: int, length: int = 6) -> list[str]:
    return dataset.items.external_many(dataset.sequences[user][:length])


def request(
    catalog: Catalog, history=(), seeds=(), exclude=(), filters=None, **fields
) -> recall_pb2.RecallRequest:
    """A packed request from external ids (via the catalog recall served)."""
    fields.setdefault("scenario", "home")
    fields.setdefault("k", 20)
    fields.setdefault("catalog", catalog.fingerprint)
    filters = filters or recall_pb2.RecallFilters()
    if exclude:
        filters.exclude_items = pack(catalog.indices(exclude), INDEX)
    return recall_pb2.RecallRequest(
        history_items=pack(catalog.indices(history), INDEX),
        seed_items=pack(catalog.indices(seeds), INDEX),
        filters=filters,
        **fields,
    )


@dataclass
class Answer:
    """A decoded reply: external ids with their sources, scores and attributes."""

    ids: list[str]
    sources: list[str]
    scores: list[float]
    source_scores: list[dict[str, float]]
    categories: list[str]
    bids: list[float]
    model_version: str


async def ask(stub, catalog: Catalog, message: recall_pb2.RecallRequest) -> Answer:
    reply = await stub.Recall(message)
    candidates = decode_recall(reply, catalog)
    masks = flags_to_mask(candidates.source_flags, len(RECALL_SOURCES))
    items = candidates.items.tolist()
    return Answer(
        ids=[catalog.item_ids[i] for i in items],
        sources=[RECALL_SOURCES[s] for s in candidates.sources.tolist()],
        scores=candidates.recall_scores.tolist(),
        source_scores=[
            {
                name: float(candidates.source_scores[row, c])
                for c, name in enumerate(RECALL_SOURCES)
                if masks[row, c]
            }
            for row in range(len(items))
        ],
        categories=[
            catalog.category_names[c] if c >= 0 else "" for c in catalog.item_category[items].tolist()
        ],
        bids=catalog.item_bid[items].tolist(),
        model_version=reply.model_version,
    )


def metric(running, name: str, labels: dict | None = None) -> float:
    return running.registry.get_sample_value(name, labels or {}) or 0.0


async def test_health_is_serving_after_warmup(server) -> None:
    running, _, channel, _ = server
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="recsys.v1.RecallService"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert metric(running, "recsys_recall_batch_size_count") >= 1  # the warm-up query ran


async def test_the_catalog_is_served_whole_and_matches_the_bundle(server, synthetic_dataset) -> None:
    _, stub, _, catalog = server
    assert catalog.item_ids == synthetic_dataset.items.ids
    assert catalog.fingerprint == catalog_fingerprint(synthetic_dataset.items.ids)
    assert sorted(catalog.popular.tolist()) == list(range(len(catalog)))
    assert await fetch_catalog(stub, catalog, 10) is catalog  # unchanged: nothing re-sent


async def test_u2i_candidates(server, synthetic_dataset) -> None:
    _, stub, _, catalog = server
    seen = history(synthetic_dataset, 0)
    reply = await ask(
        stub,
        catalog,
        request(
            catalog,
            history=seen,
            sources=[recall_pb2.SourceQuota(source="u2i", k=20)],
            filters=recall_pb2.RecallFilters(exclude_history=True),
        ),
    )
    assert len(reply.ids) == 20 and len(set(reply.ids)) == 20
    assert not set(reply.ids) & set(seen)
    assert set(reply.sources) == {"u2i"}
    assert all(
        s["u2i"] == pytest.approx(score) for s, score in zip(reply.source_scores, reply.scores, strict=True)
    )
    assert reply.model_version.startswith("recall-")
    assert all(reply.categories)  # catalog attributes for the re-rank rules


async def test_i2i_and_covisit_for_an_item_page(server, synthetic_dataset) -> None:
    _, stub, _, catalog = server
    viewed = synthetic_dataset.items.external(int(synthetic_dataset.sequences[5][0]))
    reply = await ask(
        stub,
        catalog,
        request(
            catalog,
            scenario="item_detail",
            seeds=[viewed],
            exclude=[viewed],
            sources=[
                recall_pb2.SourceQuota(source="i2i", k=10),
                recall_pb2.SourceQuota(source="covisit", k=10),
            ],
        ),
    )
    assert viewed not in reply.ids and len(reply.ids) == 20
    assert {"i2i", "covisit"} <= set(reply.sources)


async def test_popular_and_filters(server, synthetic_dataset) -> None:
    _, stub, _, catalog = server
    popular = await ask(
        stub, catalog, request(catalog, sources=[recall_pb2.SourceQuota(source="popular", k=10)], k=10)
    )
    assert popular.sources == ["popular"] * 10
    assert popular.scores == sorted(popular.scores, reverse=True)
    category = synthetic_dataset.catalog.category_names[0]
    filtered = await ask(
        stub,
        catalog,
        request(
            catalog,
            history=history(synthetic_dataset, 7),
            k=5,
            filters=recall_pb2.RecallFilters(category=category, exclude_history=True),
        ),
    )
    assert len(filtered.ids) == 5
    assert set(filtered.categories) == {category}
    sponsored = await ask(
        stub,
        catalog,
        request(
            catalog,
            history=history(synthetic_dataset, 7),
            k=5,
            filters=recall_pb2.RecallFilters(sponsored_only=True),
        ),
    )
    assert sponsored.ids and all(bid > 0 for bid in sponsored.bids)
    rest = await ask(
        stub,
        catalog,
        request(
            catalog, sources=[recall_pb2.SourceQuota(source="popular", k=10)], k=10, exclude=popular.ids[:3]
        ),
    )
    assert rest.ids[:7] == popular.ids[3:]


async def test_cold_start_serves_popular(server) -> None:
    _, stub, _, catalog = server
    cold = await ask(
        stub,
        catalog,
        request(catalog, user_id="", sources=[recall_pb2.SourceQuota(source="u2i", k=10)], k=10),
    )
    assert cold.sources == ["popular"] * 10


async def test_a_request_for_another_catalog_is_failed_precondition(server) -> None:
    _, stub, _, catalog = server
    with pytest.raises(grpc.aio.AioRpcError) as error:
        message = request(catalog)
        message.catalog = "0" * 64
        await stub.Recall(message)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.value.details().startswith("catalog:")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": -3}, "k"),
        ({"k": 10_001}, "k"),
        ({"scenario": "checkout"}, "scenario"),
        ({"scenario": ""}, "scenario"),
        ({"catalog": ""}, "catalog"),
        ({"sources": [recall_pb2.SourceQuota(source="graph", k=3)]}, "sources[0].source"),
        ({"sources": [recall_pb2.SourceQuota(source="u2i", k=-1)]}, "sources[0].k"),
        ({"history_items": pack([0] * 1001, INDEX)}, "history_items"),
        ({"history_items": b"\x01\x02\x03"}, "history_items"),
        ({"history_items": pack([10**6], INDEX)}, "history_items"),
        ({"history_items": pack([-1], INDEX)}, "history_items"),
        ({"history_items": pack([1, 2], INDEX), "history_types": b"\x01"}, "history_types"),
        ({"history_items": pack([1], INDEX), "history_types": b"\x09"}, "history_types"),
        ({"seed_items": pack([10**6], INDEX)}, "seed_items"),
        ({"filters": recall_pb2.RecallFilters(category="no-such-category")}, "filters.category"),
        ({"filters": recall_pb2.RecallFilters(exclude_items=b"\x00")}, "filters.exclude_items"),
        ({"user_id": "has space"}, "user_id"),
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field(server, fields: dict, field: str) -> None:
    _, stub, _, catalog = server
    fields.setdefault("catalog", catalog.fingerprint)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Recall(recall_pb2.RecallRequest(**{"scenario": "home", "k": 5, **fields}))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")


async def test_concurrent_calls_are_micro_batched_and_answer_like_single_calls(
    server, synthetic_dataset
) -> None:
    running, stub, _, catalog = server
    requests = [
        request(
            catalog,
            history=history(synthetic_dataset, user, 2 + user % 7),
            k=15,
            scenario=("home", "item_detail", "cart")[user % 3],
            seeds=[synthetic_dataset.items.external(user)] if user % 3 else [],
            filters=recall_pb2.RecallFilters(exclude_history=True),
        )
        for user in range(40)
    ]
    singles = [await ask(stub, catalog, r) for r in requests]
    batches_before = metric(running, "recsys_recall_batch_size_count")
    together = await asyncio.gather(*(ask(stub, catalog, r) for r in requests))
    batches = metric(running, "recsys_recall_batch_size_count") - batches_before
    assert batches < len(requests), "concurrent calls were not batched"
    for alone, batched in zip(singles, together, strict=True):
        assert alone.ids == batched.ids
        assert alone.sources == batched.sources
        np.testing.assert_allclose(alone.scores, batched.scores, atol=1e-5)


def test_serving_modules_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import recall_service, recall_service.server, recall_service.__main__, recall_service.evaluate\n"
        "import recall_service.bench\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


async def test_a_batch_call_answers_each_request_as_its_own_call(server, synthetic_dataset) -> None:
    running, stub, _, catalog = server
    requests = [
        request(catalog, history=history(synthetic_dataset, user, 3 + user), k=12, scenario="home")
        for user in range(4)
    ]
    requests[1].k = 0  # invalid: its own INVALID_ARGUMENT naming the field
    batches_before = metric(running, "recsys_recall_batch_size_count")
    reply = await stub.RecallBatch(recall_pb2.RecallBatchRequest(requests=requests, budgets_ms=[5000.0] * 4))
    batches = metric(running, "recsys_recall_batch_size_count") - batches_before
    assert [status.code for status in reply.statuses] == [0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0, 0]
    assert reply.statuses[1].message.startswith("requests[1].k:")
    assert batches == 1  # the valid requests reached the engine together
    for position in (0, 2, 3):
        alone, batched = await stub.Recall(requests[position]), reply.responses[position]
        assert (batched.items, batched.sources, batched.source_flags) == (
            alone.items,
            alone.sources,
            alone.source_flags,
        )
        np.testing.assert_allclose(  # the user tower batched with others: float noise only
            np.frombuffer(batched.scores, "<f4"), np.frombuffer(alone.scores, "<f4"), atol=1e-5
        )
        assert (batched.model_version, batched.catalog) == (alone.model_version, alone.catalog)
    assert not reply.responses[1].items


async def test_a_malformed_recall_batch_is_invalid_argument(server) -> None:
    _, stub, _, catalog = server
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.RecallBatch(
            recall_pb2.RecallBatchRequest(requests=[request(catalog)], budgets_ms=[1.0, 2.0])
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("budgets_ms:")
