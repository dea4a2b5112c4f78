"""Integration: the real rank server on port 0 over the tiny rank bundle (trained on the tiny
recall bundle's candidates)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rank_service.config import RankConfig
from rank_service.export import checkpoint_path, load_checkpoint
from rank_service.features import SOURCES
from rank_service.server import serve
from rank_service.servicer import MAX_CANDIDATES
from rank_service.train import TorchScorer
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry
from recsys.serving.wire import FLAGS, INDEX, SCORE, catalog_fingerprint, mask_to_flags, pack
from recsys.v1 import common_pb2, rank_pb2, rank_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
async def server(rank_bundle: Path):
    config = RankConfig(
        serving=ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=1),
        bundle=rank_bundle,
        device="cpu",
        max_batch=8,
        max_wait_ms=30.0,
        threads=1,
    )
    running = await serve(config, registry=new_registry(process_metrics=False))
    channel = grpc.aio.insecure_channel(running.address)
    yield running, rank_pb2_grpc.RankServiceStub(channel), channel
    await channel.close()
    await running.stop(grace=0)


def request_for(
    items: list[str],
    history: list[str],
    scenario: str = "home",
    catalog_ids: list[str] | None = None,
    **fields,
) -> rank_pb2.RankRequest:
    """A packed request: odd positions from u2i, even ones from covisit + popular."""
    assert catalog_ids is not None
    index = {item_id: position for position, item_id in enumerate(catalog_ids)}
    count = len(items)
    source_scores = np.zeros((count, len(SOURCES)), np.float32)
    recall_scores = np.zeros(count, np.float32)
    for position in range(count):
        if position % 2:
            source_scores[position, SOURCES.index("u2i")] = 1.0 - 0.01 * position
        else:
            source_scores[position, SOURCES.index("covisit")] = 3.0 / (1 + position)
            source_scores[position, SOURCES.index("popular")] = 5.0
        recall_scores[position] = source_scores[position].max()
    return rank_pb2.RankRequest(
        scenario=scenario,
        catalog=catalog_fingerprint(catalog_ids),
        history_items=pack([index[i] for i in history], INDEX),
        history_types=pack([common_pb2.CLICK] * len(history), FLAGS),
        candidate_items=pack([index[i] for i in items], INDEX),
        recall_scores=pack(recall_scores, SCORE),
        source_names=SOURCES,
        source_scores=pack(source_scores, SCORE),
        source_flags=pack(mask_to_flags(source_scores != 0), FLAGS),
        **fields,
    )


def catalog(rank_bundle: Path) -> list[str]:
    return (rank_bundle / "items.txt").read_text().splitlines()


def scores_of(reply: rank_pb2.RankResponse) -> np.ndarray:
    return np.frombuffer(reply.scores, "<f4")


def offline_scores(rank_bundle: Path, request: rank_pb2.RankRequest) -> np.ndarray:
    """The torch model (training checkpoint) on the same request, through the training features."""
    from rank_service.candidates import Candidates

    model, _, scenarios, _ = load_checkpoint(checkpoint_path(rank_bundle))
    candidate_items = np.frombuffer(request.candidate_items, "<i4").astype(np.int64)
    source_scores = np.frombuffer(request.source_scores, "<f4").reshape(len(candidate_items), len(SOURCES))
    candidates = Candidates(
        candidate_items,
        np.frombuffer(request.recall_scores, "<f4").copy(),
        source_scores.copy(),
        source_scores != 0,
    )
    history = np.frombuffer(request.history_items, "<i4").astype(np.int64)
    events = np.frombuffer(request.history_types, "u1").astype(np.int64)
    (scores,) = TorchScorer(model).score(
        [history], [events], [scenarios.index(request.scenario)], [candidates]
    )
    return scores


async def test_health_is_serving_after_warmup(server):
    _, _, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "recsys.v1.RankService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_scores_equal_offline_model(server, rank_bundle):
    _, stub, _ = server
    items = catalog(rank_bundle)
    request = request_for(items[10:40], items[:6], scenario="cart", catalog_ids=items)
    reply = await stub.Rank(request)
    served = scores_of(reply)
    assert len(served) == 30
    assert np.abs(served - offline_scores(rank_bundle, request)).max() <= 1e-4
    assert reply.model_version and reply.catalog == request.catalog


async def test_concurrent_calls_are_batched_and_equal_single_calls(server, rank_bundle):
    running, stub, _ = server
    items = catalog(rank_bundle)
    requests = [
        request_for(items[20 + i : 30 + 3 * i], items[i : i + i % 5], catalog_ids=items) for i in range(8)
    ]
    singles = [await stub.Rank(request) for request in requests]
    together = await asyncio.gather(*(stub.Rank(request) for request in requests))
    for single, batched in zip(singles, together, strict=True):
        assert np.allclose(scores_of(single), scores_of(batched), atol=1e-5)
    batch_sizes = running.registry.get_sample_value("recsys_rank_batch_size_sum")
    batches = running.registry.get_sample_value("recsys_rank_batch_size_count")
    assert batch_sizes > batches  # at least one run served several requests


async def test_empty_history_gives_finite_scores(server, rank_bundle):
    _, stub, _ = server
    items = catalog(rank_bundle)
    reply = await stub.Rank(request_for(items[:50], [], catalog_ids=items))
    assert len(scores_of(reply)) == 50
    assert np.isfinite(scores_of(reply)).all()


async def test_a_request_for_another_catalog_is_failed_precondition(server, rank_bundle):
    _, stub, _ = server
    items = catalog(rank_bundle)
    request = request_for(items[3:6], items[:3], catalog_ids=items)
    request.catalog = "0" * 64
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Rank(request)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error.value.details().startswith("catalog:")


async def test_debug_returns_attended_history_positions(server, rank_bundle):
    _, stub, _ = server
    items = catalog(rank_bundle)
    reply = await stub.Rank(request_for(items[10:15], items[:4], debug=True, catalog_ids=items))
    attended = np.frombuffer(reply.attended, "<i4").reshape(5, 3)
    for row in attended:
        positions = [p for p in row.tolist() if p >= 0]
        assert 1 <= len(positions) <= 3 and all(0 <= p < 4 for p in positions)


def _set(field: str, value):
    return lambda request: setattr(request, field, value)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_set("candidate_items", b""), "candidate_items"),
        (_set("candidate_items", pack([0] * (MAX_CANDIDATES + 1), INDEX)), "candidate_items"),
        (_set("candidate_items", b"\x00\x01"), "candidate_items"),
        (_set("candidate_items", pack([0, 1, 10**7, 2], INDEX)), "candidate_items"),
        (_set("scenario", "checkout"), "scenario"),
        (_set("scenario", ""), "scenario"),
        (_set("catalog", ""), "catalog"),
        (_set("user_id", "bad id"), "user_id"),
        (_set("history_items", pack([-5], INDEX)), "history_items"),
        (_set("history_types", b"\x09\x01"), "history_types"),
        (_set("history_types", b"\x01"), "history_types"),
        (_set("recall_scores", pack([1.0, float("nan"), 0.0, 0.0], SCORE)), "recall_scores"),
        (_set("recall_scores", pack([1.0], SCORE)), "recall_scores"),
        (_set("source_scores", pack([0.0] * 15 + [float("inf")], SCORE)), "source_scores"),
        (_set("source_flags", b"\x01"), "source_flags"),
        (lambda request: request.source_names.__setitem__(0, "ads"), "source_names[0]"),
        (lambda request: request.source_names.__setitem__(1, "u2i"), "source_names[1]"),
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field(server, rank_bundle, mutate, field):
    _, stub, _ = server
    items = catalog(rank_bundle)
    request = request_for(items[5:9], items[:2], catalog_ids=items)
    mutate(request)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Rank(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")


async def test_a_batch_call_answers_each_request_as_its_own_call(server, rank_bundle):
    running, stub, _ = server
    items = catalog(rank_bundle)
    requests = [
        request_for(items[20 + i : 30 + 3 * i], items[i : i + i % 5], catalog_ids=items) for i in range(5)
    ]
    requests[2].catalog = "0" * 64  # another catalog: its own FAILED_PRECONDITION
    requests[3].scenario = "checkout"  # invalid: its own INVALID_ARGUMENT naming the field
    batches_before = running.registry.get_sample_value("recsys_rank_batch_size_count")
    reply = await stub.RankBatch(rank_pb2.RankBatchRequest(requests=requests))
    batches = running.registry.get_sample_value("recsys_rank_batch_size_count") - batches_before
    codes = [status.code for status in reply.statuses]
    assert codes == [
        0,
        0,
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        0,
    ]
    assert reply.statuses[3].message.startswith("requests[3].scenario:")
    assert batches == 1  # the valid requests reached the ranker together
    for position in (0, 1, 4):
        alone = await stub.Rank(requests[position])
        assert np.allclose(scores_of(reply.responses[position]), scores_of(alone), atol=1e-5)
        assert reply.responses[position].model_version == alone.model_version
    assert not reply.responses[2].scores and not reply.responses[3].scores


@pytest.mark.parametrize(
    ("budgets", "count", "field"),
    [
        ((), 0, "requests"),
        ((), 257, "requests"),
        ((5.0,), 2, "budgets_ms"),
        ((5.0, -1.0), 2, "budgets_ms[1]"),
    ],
)
async def test_a_malformed_batch_is_invalid_argument_naming_the_field(
    server, rank_bundle, budgets, count, field
):
    _, stub, _ = server
    items = catalog(rank_bundle)
    one = request_for(items[:5], items[5:7], catalog_ids=items)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.RankBatch(rank_pb2.RankBatchRequest(requests=[one] * count, budgets_ms=budgets))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")


async def test_a_request_whose_budget_is_spent_is_dropped_unrun(server, rank_bundle):
    _, stub, _ = server
    items = catalog(rank_bundle)
    one = request_for(items[:5], items[5:7], catalog_ids=items)
    reply = await stub.RankBatch(rank_pb2.RankBatchRequest(requests=[one, one], budgets_ms=[0.0, 5000.0]))
    assert [status.code for status in reply.statuses] == [grpc.StatusCode.DEADLINE_EXCEEDED.value[0], 0]
    assert len(scores_of(reply.responses[1])) == 5
