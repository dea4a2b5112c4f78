"""The recall engine over the tiny bundle: sources, merge, quotas, filters, cold start, batching."""

from __future__ import annotations

import numpy as np
import pytest

from recall_service.engine import SOURCE_INDEX, SOURCES, CandidateList, RecallEngine, RecallQuery


def history_of(synthetic_dataset, user: int, length: int = 6) -> np.ndarray:
    return np.asarray(synthetic_dataset.sequences[user][:length], dtype=np.int64)


def assert_well_formed(result: CandidateList, query: RecallQuery) -> None:
    assert len(result.items) == len(np.unique(result.items)), "duplicates"
    assert len(result.items) <= query.k
    assert result.source_scores.shape == result.source_mask.shape == (len(result.items), len(SOURCES))
    for row, source in enumerate(result.sources):
        column = SOURCE_INDEX[source]
        assert result.source_mask[row, column]
        assert result.scores[row] == result.source_scores[row, column]
    assert np.all(result.source_scores[~result.source_mask] == 0)
    if query.exclude_history:
        assert not np.isin(result.items, query.history).any()
    assert not np.isin(result.items, query.exclude_items).any()


def test_u2i_returns_k_unseen_items_best_first(recall_engine: RecallEngine, synthetic_dataset) -> None:
    query = RecallQuery(history=history_of(synthetic_dataset, 0), quotas={"u2i": 30}, k=30)
    (result,) = recall_engine.recall([query])
    assert_well_formed(result, query)
    assert len(result.items) == 30
    assert set(result.sources) == {"u2i"}
    assert np.all(np.diff(result.scores) <= 1e-6)
    # the scores are inner products of the user vector with the item vectors
    user = recall_engine._user_vectors([query])[0]
    np.testing.assert_allclose(result.scores, recall_engine.item_vectors[result.items] @ user, atol=1e-5)


def test_default_sources_merge_under_quotas(recall_engine: RecallEngine, synthetic_dataset) -> None:
    query = RecallQuery(history=history_of(synthetic_dataset, 1, 8), k=40)
    (result,) = recall_engine.recall([query])
    assert_well_formed(result, query)
    assert len(result.items) == 40
    quotas = recall_engine.default_quotas(0, 40)
    for source, quota in quotas.items():
        assert result.sources.count(source) <= quota
    assert {"u2i", "covisit"} <= set(result.sources)


def test_quotas_cap_each_source_and_k_is_still_reached(
    recall_engine: RecallEngine, synthetic_dataset
) -> None:
    query = RecallQuery(history=history_of(synthetic_dataset, 2), quotas={"u2i": 5, "covisit": 5}, k=25)
    (result,) = recall_engine.recall([query])
    assert_well_formed(result, query)
    assert result.sources.count("u2i") <= 5 and result.sources.count("covisit") <= 5
    assert len(result.items) == 25  # topped up from popularity
    assert result.sources[-1] == "popular"
    no_fill = RecallQuery(history=query.history, quotas=query.quotas, k=25, fill_popular=False)
    (short,) = recall_engine.recall([no_fill])
    assert len(short.items) <= 10


def test_cold_start_is_popularity(recall_engine: RecallEngine) -> None:
    query = RecallQuery(history=np.zeros(0, np.int64), quotas={"u2i": 10}, k=10)
    (result,) = recall_engine.recall([query])
    assert result.sources == ["popular"] * 10
    np.testing.assert_array_equal(result.items, recall_engine.popularity.ranked()[:10])


def test_i2i_finds_neighbours_of_the_seed_but_not_the_seed(recall_engine: RecallEngine) -> None:
    seed = 5
    query = RecallQuery(
        history=np.zeros(0, np.int64), seed_items=np.array([seed]), quotas={"i2i": 10}, k=10, scenario=1
    )
    (result,) = recall_engine.recall([query])
    assert seed not in result.items
    assert set(result.sources) == {"i2i"}
    vectors = recall_engine.item_vectors
    expected = np.argsort(-(vectors @ vectors[seed]), kind="stable")
    expected = expected[expected != seed][:10]
    assert set(result.items.tolist()) == set(expected.tolist())


def test_exclusions_category_and_sponsored_filters_still_return_k(
    recall_engine: RecallEngine, synthetic_dataset
) -> None:
    history = history_of(synthetic_dataset, 3)
    exclude = recall_engine.recall([RecallQuery(history=history, quotas={"u2i": 5}, k=5)])[0].items
    query = RecallQuery(history=history, quotas={"u2i": 20, "covisit": 20}, k=20, exclude_items=exclude)
    (result,) = recall_engine.recall([query])
    assert_well_formed(result, query)
    assert len(result.items) == 20

    category = int(np.bincount(recall_engine.item_category[recall_engine.item_category >= 0]).argmax())
    in_category = np.flatnonzero(recall_engine.item_category == category)
    k = min(15, len(in_category) - len(np.intersect1d(in_category, history)))
    query = RecallQuery(history=history, k=k, category=category)
    (result,) = recall_engine.recall([query])
    assert_well_formed(result, query)
    assert len(result.items) == k
    assert np.all(recall_engine.item_category[result.items] == category)

    sponsored = np.flatnonzero(recall_engine.item_bid > 0)
    query = RecallQuery(history=history, k=len(sponsored) + 10, sponsored_only=True)
    (result,) = recall_engine.recall([query])
    assert_well_formed(result, query)
    assert np.all(recall_engine.item_bid[result.items] > 0)
    assert len(result.items) == len(np.setdiff1d(sponsored, history))  # all the catalog allows


def test_keeping_history_allows_seen_items(recall_engine: RecallEngine, synthetic_dataset) -> None:
    history = history_of(synthetic_dataset, 4)
    query = RecallQuery(
        history=history, quotas={"popular": 0}, k=recall_engine.num_items, exclude_history=False
    )
    (result,) = recall_engine.recall([query])
    assert len(result.items) == recall_engine.num_items
    assert np.isin(history, result.items).all()


def test_a_batch_answers_exactly_like_single_queries(recall_engine: RecallEngine, synthetic_dataset) -> None:
    queries = [
        RecallQuery(
            history=history_of(synthetic_dataset, user, 2 + user % 9),
            k=20,
            scenario=user % 3,
            seed_items=np.array([user], dtype=np.int64) if user % 2 else np.zeros(0, np.int64),
            category=user % 4 - 1,
        )
        for user in range(12)
    ]
    queries.append(RecallQuery(history=np.zeros(0, np.int64), k=7))
    batched = recall_engine.recall(queries)
    for query, together in zip(queries, batched, strict=True):
        (alone,) = recall_engine.recall([query])
        np.testing.assert_array_equal(together.items, alone.items)
        assert together.sources == alone.sources
        np.testing.assert_allclose(together.source_scores, alone.source_scores, atol=1e-5)


def test_unknown_sources_are_rejected(recall_engine: RecallEngine) -> None:
    with pytest.raises(ValueError, match="unknown recall sources"):
        recall_engine.recall([RecallQuery(history=np.array([1]), quotas={"graph": 3}, k=3)])
