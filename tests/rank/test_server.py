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
from rank_service.features import SOURCES, UNKNOWN_CANDIDATE_SCORE
from rank_service.server import serve
from rank_service.servicer import MAX_CANDIDATES
from rank_service.train import TorchScorer
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry
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
    items: list[str], history: list[str], scenario: str = "home", **fields
) -> rank_pb2.RankRequest:
    candidates = []
    for position, item in enumerate(items):
        scores = (
            {"u2i": 1.0 - 0.01 * position}
            if position % 2
            else {"covisit": 3.0 / (1 + position), "popular": 5.0}
        )
        source = max(scores, key=scores.get)
        candidates.append(
            rank_pb2.RankCandidate(
                item_id=item, recall_score=scores[source], source=source, source_scores=scores
            )
        )
    return rank_pb2.RankRequest(
        scenario=scenario,
        history=[common_pb2.HistoryItem(item_id=i, type=common_pb2.CLICK) for i in history],
        candidates=candidates,
        **fields,
    )


def catalog(rank_bundle: Path) -> list[str]:
    return (rank_bundle / "items.txt").read_text().splitlines()


def offline_scores(rank_bundle: Path, request: rank_pb2.RankRequest) -> np.ndarray:
    """The torch model (training checkpoint) on the same request, through the training features."""
    from rank_service.candidates import Candidates

    model, items, scenarios, _ = load_checkpoint(checkpoint_path(rank_bundle))
    count = len(request.candidates)
    source_scores = np.zeros((count, len(SOURCES)), np.float32)
    for row, candidate in enumerate(request.candidates):
        for source, score in candidate.source_scores.items():
            source_scores[row, SOURCES.index(source)] = score
    candidates = Candidates(
        items.dense_many([c.item_id for c in request.candidates]),
        np.array([c.recall_score for c in request.candidates], np.float32),
        source_scores,
        source_scores != 0,
    )
    history = items.dense_many([h.item_id for h in request.history])
    events = np.array([h.type for h in request.history], np.int64)
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
    request = request_for(items[10:40], items[:6], scenario="cart")
    reply = await stub.Rank(request)
    assert [r.item_id for r in reply.results] == items[10:40]
    served = np.array([r.score for r in reply.results])
    assert np.abs(served - offline_scores(rank_bundle, request)).max() <= 1e-4
    assert reply.unknown_candidates == 0 and reply.model_version


async def test_concurrent_calls_are_batched_and_equal_single_calls(server, rank_bundle):
    running, stub, _ = server
    items = catalog(rank_bundle)
    requests = [request_for(items[20 + i : 30 + 3 * i], items[i : i + i % 5]) for i in range(8)]
    singles = [await stub.Rank(request) for request in requests]
    together = await asyncio.gather(*(stub.Rank(request) for request in requests))
    for single, batched in zip(singles, together, strict=True):
        assert np.allclose([r.score for r in single.results], [r.score for r in batched.results], atol=1e-5)
    batch_sizes = running.registry.get_sample_value("recsys_rank_batch_size_sum")
    batches = running.registry.get_sample_value("recsys_rank_batch_size_count")
    assert batch_sizes > batches  # at least one run served several requests


async def test_empty_history_gives_finite_scores(server, rank_bundle):
    _, stub, _ = server
    reply = await stub.Rank(request_for(catalog(rank_bundle)[:50], []))
    assert len(reply.results) == 50
    assert np.isfinite([r.score for r in reply.results]).all()


async def test_unknown_candidates_get_the_low_score_and_are_counted(server, rank_bundle):
    running, stub, _ = server
    items = catalog(rank_bundle)
    reply = await stub.Rank(request_for([items[3], "no-such-item", items[4]], items[:3]))
    assert reply.unknown_candidates == 1
    scores = [r.score for r in reply.results]
    assert scores[1] == pytest.approx(float(UNKNOWN_CANDIDATE_SCORE))
    assert min(scores[0], scores[2]) > scores[1]
    assert running.registry.get_sample_value("recsys_rank_unknown_candidates_total") >= 1


async def test_debug_returns_attended_history_items(server, rank_bundle):
    _, stub, _ = server
    items = catalog(rank_bundle)
    reply = await stub.Rank(request_for(items[10:15], items[:4], debug=True))
    for result in reply.results:
        assert 1 <= len(result.attended_item_ids) <= 3
        assert set(result.attended_item_ids) <= set(items[:4])


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r, items: r.ClearField("candidates"), "candidates"),
        (lambda r, items: r.candidates.extend([r.candidates[0]] * MAX_CANDIDATES), "candidates"),
        (lambda r, items: setattr(r, "scenario", "checkout"), "scenario"),
        (lambda r, items: setattr(r, "scenario", ""), "scenario"),
        (lambda r, items: setattr(r.candidates[1], "item_id", ""), "candidates[1].item_id"),
        (lambda r, items: setattr(r.candidates[0], "item_id", "bad id"), "candidates[0].item_id"),
        (lambda r, items: setattr(r.history[1], "item_id", "x\ty"), "history[1].item_id"),
        (
            lambda r, items: r.candidates[0].source_scores.__setitem__("ads", 1.0),
            "candidates[0].source_scores",
        ),
        (lambda r, items: setattr(r.candidates[2], "source", "magic"), "candidates[2].source"),
        (
            lambda r, items: setattr(r.candidates[0], "recall_score", float("nan")),
            "candidates[0].recall_score",
        ),
        (lambda r, items: setattr(r.history[0], "type", 9), "history[0].type"),
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field(server, rank_bundle, mutate, field):
    _, stub, _ = server
    items = catalog(rank_bundle)
    request = request_for(items[5:9], items[:2])
    mutate(request, items)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Rank(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:")
