"""The recall side of GetUserProfile: per-category and per-brand centroids of the item embeddings
(computed once per bundle, held by its engine), the nearest ones to a user embedding (the u2i
user-tower run, batched with Recall), and the ``UserProfile`` RPC with its validation."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from recall_service import engine as engine_module
from recall_service.config import RecallConfig
from recall_service.engine import AttributeCentroids, NearestAttributes, RecallEngine, RecallQuery
from recall_service.server import build_servicer, serve
from recall_service.servicer import RecallJob, RecallModel, run_recall_jobs
from recsys.data.dataset import IdMap
from recsys.scenario.catalog import Catalog, fetch_catalog
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry
from recsys.serving.wire import FLAGS, INDEX, SCORE, pack
from recsys.v1 import recall_pb2, recall_pb2_grpc

# -- the centroids ----------------------------------------------------------------------------


def test_centroids_are_normalised_means_of_normalised_item_vectors():
    vectors = np.array([[1, 0], [0, 2], [3, 0], [5, 5], [0, 1]], dtype=np.float32)
    labels = np.array([0, 0, 1, -1, 7])  # -1: none; 7: beyond the names (ignored)
    centroids = AttributeCentroids.of(vectors, labels, 3)
    # value 0: mean of [1, 0] and [0, 1] (the second normalised), normalised
    np.testing.assert_allclose(centroids.vectors, [[0.5**0.5, 0.5**0.5], [1, 0], [0, 0]], atol=1e-6)
    assert centroids.present.tolist() == [True, True, False]  # value 2: no item has it
    values, similarities = centroids.nearest(np.array([0.2, 0.9, 5.0], np.float32), top_n=3)
    assert values.tolist() == [1, 0] and similarities.tolist() == pytest.approx([0.9, 0.2])  # absent: never


def test_centroids_do_not_depend_on_the_chunking(monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(500, 8)).astype(np.float32)
    labels = rng.integers(-1, 9, size=500)
    whole = AttributeCentroids.of(vectors, labels, 9)
    monkeypatch.setattr(engine_module, "CENTROID_CHUNK", 7)  # values straddle chunk boundaries
    chunked = AttributeCentroids.of(vectors, labels, 9)
    np.testing.assert_allclose(chunked.vectors, whole.vectors, atol=1e-6)
    assert chunked.present.tolist() == whole.present.tolist()


def handmade_engine(calls: list[int]) -> RecallEngine:
    """Six items on three axes: items 0-1 on x (category c0, brand b0), 2-3 on y (c1, b1), 4-5 on
    z (c2, b1). The user tower is the mean of the history's item vectors; ``calls`` records each
    run's batch size."""
    item_vectors = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)

    def user_tower(items: np.ndarray, _events: np.ndarray, _scenarios: np.ndarray) -> np.ndarray:
        calls.append(len(items))
        padded = np.vstack([np.zeros((1, 3), np.float32), item_vectors])  # index 0 = padding
        return padded[items].sum(axis=1)

    return RecallEngine(
        manifest={"version": "handmade-1", "scenarios": ["home"], "max_length": 4},
        user_tower=user_tower,  # type: ignore[arg-type]
        searcher=None,  # type: ignore[arg-type]  # not searched here
        item_vectors=item_vectors,
        items=IdMap(f"i{i}" for i in range(6)),
        covisit=None,  # type: ignore[arg-type]
        popularity=None,  # type: ignore[arg-type]
        item_category=np.array([0, 0, 1, 1, 2, 2]),
        category_names=["c0", "c1", "c2"],
        item_brand=np.array([0, 0, 1, 1, 1, 1]),
        brand_names=["b0", "b1"],
        item_bid=np.zeros(6, np.float32),
    )


def test_the_nearest_clusters_of_a_one_category_history_start_with_that_category():
    calls: list[int] = []
    engine = handmade_engine(calls)
    queries = [
        RecallQuery(history=np.array([2, 3, 2])),  # all c1 / b1
        RecallQuery(history=np.array([], np.int64)),  # no history: nothing to embed
        RecallQuery(history=np.array([0, 4, 0])),  # mostly c0
    ]
    first, empty, mixed = engine.nearest_attributes(queries, top_n=[2, 5, 3])
    assert calls == [2]  # one user-tower run for the queries with a history
    assert first.categories.tolist()[:1] == [1] and len(first.categories) == 2
    assert first.category_similarities[0] == pytest.approx(1.0)
    assert first.brands.tolist()[0] == 1
    assert (len(empty.categories), len(empty.brands)) == (0, 0)
    assert mixed.categories.tolist() == [0, 2, 1]
    assert np.all(np.diff(mixed.category_similarities) <= 0)


def test_the_bundle_centroids_match_an_independent_computation(recall_engine: RecallEngine):
    engine = recall_engine
    for centroids, labels, names in (
        (engine.category_centroids, engine.item_category, engine.category_names),
        (engine.brand_centroids, engine.item_brand, engine.brand_names),
    ):
        assert centroids.vectors.shape == (len(names), engine.item_vectors.shape[1])
        for value in range(len(names)):
            members = engine.item_vectors[labels == value].astype(np.float64)
            assert centroids.present[value] == bool(len(members))
            if not len(members):
                continue
            mean = (members / np.linalg.norm(members, axis=1, keepdims=True)).mean(axis=0)
            np.testing.assert_allclose(centroids.vectors[value], mean / np.linalg.norm(mean), atol=1e-5)
    assert engine.category_centroids is engine.category_centroids  # computed once per engine


def test_a_loaded_bundle_holds_its_centroids_before_the_first_request(recall_bundle: Path):
    """Computed where the bundle is loaded (a hot swap's load thread), not on the batcher's thread."""
    engine = RecallEngine.load(recall_bundle, device="cpu", threads=1)
    assert "category_centroids" not in vars(engine)
    RecallModel(engine)
    assert {"category_centroids", "brand_centroids"} <= set(vars(engine))


def test_one_category_histories_are_near_their_own_category(recall_engine: RecallEngine):
    """On the tiny bundle the user tower maps every history to nearly the same vector (pairwise
    cosine ~0.99 after seconds of training), so the raw top-3 is about the same for every user and
    "a one-category history has its category in its top 3" does not hold there. What does is the
    relative property: among histories each made of one category's items, a category's centroid is
    nearest to (one of the three nearest) that category's own history."""
    engine = recall_engine
    categories = [c for c in range(len(engine.category_names)) if (engine.item_category == c).sum() >= 5]
    assert len(categories) >= 4
    queries = [RecallQuery(history=np.flatnonzero(engine.item_category == c)[:10]) for c in categories]
    users = engine.user_vectors(queries)
    users = users / np.linalg.norm(users, axis=1, keepdims=True)
    similarities = users @ engine.category_centroids.vectors[categories].T  # [history, centroid]
    own_rank = [int((similarities[:, i] > similarities[i, i]).sum()) for i in range(len(categories))]
    assert sum(rank < 3 for rank in own_rank) >= 0.8 * len(categories), own_rank
    # and what the engine answers is this cosine ranking
    answers = engine.nearest_attributes(queries, [len(engine.category_names)] * len(queries))
    for row, answer in enumerate(answers):
        expected = users[row] @ engine.category_centroids.vectors[answer.categories].T
        np.testing.assert_allclose(answer.category_similarities, expected, atol=1e-5)
        assert np.all(np.diff(answer.category_similarities) <= 1e-7)


def test_profile_jobs_batch_with_recall_jobs_without_changing_them(recall_engine: RecallEngine):
    model = RecallModel(recall_engine)
    history = recall_engine.popularity.global_order[:6].astype(np.int64)
    recall_query = RecallQuery(history=history, k=20)
    alone = run_recall_jobs([RecallJob(model, recall_query)])[0]
    mixed = run_recall_jobs(
        [RecallJob(model, recall_query), RecallJob(model, RecallQuery(history=history), nearest_top_n=3)]
    )
    assert mixed[0].items.tolist() == alone.items.tolist()  # type: ignore[union-attr]
    profile = mixed[1]
    assert isinstance(profile, NearestAttributes) and len(profile.categories) == 3
    direct = recall_engine.nearest_attributes([RecallQuery(history=history)], [3])[0]
    assert profile.categories.tolist() == direct.categories.tolist()


async def test_a_swapped_bundle_answers_with_its_own_centroids(recall_bundle: Path):
    old = RecallEngine.load(recall_bundle, device="cpu", threads=1)
    new = RecallEngine.load(recall_bundle, device="cpu", threads=1)
    config = RecallConfig(serving=ServingConfig(), bundle=recall_bundle, device="cpu", threads=1)
    servicer = build_servicer(old, config, new_registry(False))
    request = recall_pb2.UserProfileRequest(
        catalog=servicer.catalog, history_items=pack([0, 1, 2], INDEX), top_n=2
    )
    before = await servicer.user_profile(request)
    new.brand_centroids = AttributeCentroids(  # a bundle whose brands all sit elsewhere
        np.zeros_like(old.brand_centroids.vectors), np.zeros(len(old.brand_names), bool)
    )
    servicer.swap(RecallModel(new))
    after = await servicer.user_profile(request)
    assert before.categories == after.categories and before.brands and not after.brands
    servicer.batcher.close()


# -- the RPC ----------------------------------------------------------------------------------


@pytest.fixture
async def server(recall_bundle: Path):
    config = RecallConfig(
        serving=ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=1.0),
        bundle=recall_bundle,
        device="cpu",
        threads=1,
    )
    running = await serve(config, registry=new_registry(process_metrics=False))
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = recall_pb2_grpc.RecallServiceStub(channel)
        yield stub, await fetch_catalog(stub, None, 10)
    await running.stop(grace=0)


def profile_request(known: Catalog, history=(), **fields) -> recall_pb2.UserProfileRequest:
    fields.setdefault("top_n", 3)
    fields.setdefault("catalog", known.fingerprint)
    return recall_pb2.UserProfileRequest(history_items=pack(list(history), INDEX), **fields)


async def test_the_rpc_answers_the_engines_nearest_clusters(server, recall_engine: RecallEngine):
    stub, catalog = server
    history = [int(i) for i in np.flatnonzero(recall_engine.item_category == 0)[:6]]
    types = [1, 2, 1, 3, 1, 4]
    reply = await stub.UserProfile(
        profile_request(catalog, history, history_types=pack(types, FLAGS), top_n=3), timeout=10
    )
    assert reply.catalog == catalog.fingerprint and reply.model_version == catalog.version
    categories = np.frombuffer(reply.categories, "<i4")
    brands = np.frombuffer(reply.brands, "<i4")
    assert len(categories) == 3 and len(brands) == 3
    category_similarities = np.frombuffer(reply.category_similarities, SCORE)
    brand_similarities = np.frombuffer(reply.brand_similarities, SCORE)
    assert np.all(np.diff(category_similarities) <= 1e-7) and np.all(np.diff(brand_similarities) <= 1e-7)
    direct = recall_engine.nearest_attributes(
        [RecallQuery(history=np.array(history), event_types=np.array(types), scenario=0)], [3]
    )[0]
    assert categories.tolist() == direct.categories.tolist() and brands.tolist() == direct.brands.tolist()
    np.testing.assert_allclose(category_similarities, direct.category_similarities, atol=1e-5)
    empty = await stub.UserProfile(profile_request(catalog, []), timeout=10)
    assert (empty.categories, empty.brands) == (b"", b"")
    many = await stub.UserProfile(profile_request(catalog, history, top_n=100), timeout=10)
    assert len(np.frombuffer(many.categories, "<i4")) == int(recall_engine.category_centroids.present.sum())


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"catalog": ""}, "catalog"),
        ({"top_n": 0}, "top_n"),
        ({"top_n": 101}, "top_n"),
        ({"request_id": "has space"}, "request_id"),
        ({"scenario": "nope"}, "scenario"),
        ({"history_items": b"\x01\x00\x00"}, "history_items"),
        ({"history_items": pack([10**6], INDEX)}, "history_items"),
        ({"history_items": pack([0] * 1001, INDEX)}, "history_items"),
        ({"history_types": pack([1], FLAGS)}, "history_types"),
        ({"history_types": pack([1, 9], FLAGS)}, "history_types"),
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field(server, fields: dict, field: str):
    stub, catalog = server
    message = profile_request(catalog, [0, 1])
    for name, value in fields.items():
        setattr(message, name, value)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UserProfile(message, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")


async def test_another_catalog_is_failed_precondition(server):
    stub, catalog = server
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UserProfile(profile_request(catalog, [0], catalog="0" * 64), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.details().startswith("catalog: ")
