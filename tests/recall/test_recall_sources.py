"""Co-visitation and popularity tables on hand-made data."""

from __future__ import annotations

import numpy as np
import pytest

from recall_service.sources import PopularityTable, build_covisit_table, covisit_candidates


def test_covisit_weights_follow_distance_direction_and_popularity() -> None:
    # 0 -> 1 -> 2 twice, and 3 -> 1 once; item 1 is the most popular.
    sequences = [np.array([0, 1, 2]), np.array([0, 1, 2]), np.array([3, 1])]
    table = build_covisit_table(
        sequences, num_items=4, window=2, backward_weight=0.5, popularity_exponent=0.0, top_m=10
    )
    neighbours, scores = table.row(0)
    weights = dict(zip(neighbours.tolist(), scores.tolist(), strict=True))
    # a forward step at distance 1 counts 1, at distance 2 counts 1/2; two sequences
    assert weights == pytest.approx({1: 2.0, 2: 1.0})
    neighbours, scores = table.row(1)
    weights = dict(zip(neighbours.tolist(), scores.tolist(), strict=True))
    # 1 -> 2 forward twice (2.0); 0 and 3 precede 1: backward weight 0.5 each time
    assert weights == pytest.approx({2: 2.0, 0: 1.0, 3: 0.5})
    assert neighbours.tolist() == [2, 0, 3]  # best first
    assert table.row(2)[0].tolist() == [1, 0]  # 2 <- 1 (0.5 * 2), 2 <- 0 at distance 2 (0.25 * 2)


def test_covisit_popularity_normalisation_demotes_bestsellers() -> None:
    # item 1 follows 0 three times but is bought everywhere; item 2 follows 0 twice and is niche
    sequences = [np.array([0, 1]), np.array([0, 1]), np.array([0, 1]), np.array([0, 2]), np.array([0, 2])]
    sequences += [np.array([1, 3])] * 30
    plain = build_covisit_table(sequences, 4, window=1, backward_weight=0.0, popularity_exponent=0.0)
    normalised = build_covisit_table(sequences, 4, window=1, backward_weight=0.0, popularity_exponent=0.5)
    assert plain.row(0)[0].tolist() == [1, 2]
    assert normalised.row(0)[0].tolist() == [2, 1]


def test_covisit_keeps_top_m_and_never_pairs_an_item_with_itself() -> None:
    sequences = [np.array([0, 0, 1, 2, 3, 4, 5])]
    table = build_covisit_table(sequences, 6, window=5, backward_weight=1.0, top_m=2)
    for item in range(6):
        neighbours, scores = table.row(item)
        assert len(neighbours) <= 2
        assert item not in neighbours.tolist()
        assert np.all(np.diff(scores) <= 0)


def test_covisit_candidates_sum_recency_weighted_rows_with_popularity_tie_break() -> None:
    sequences = [np.array([0, 2]), np.array([1, 3]), np.array([1, 4]), np.array([4, 4, 4])]
    table = build_covisit_table(sequences, 5, window=1, backward_weight=0.0, popularity_exponent=0.0)
    counts = np.array([1, 2, 1, 1, 4])
    items, scores = covisit_candidates(table, np.array([1, 0]), np.array([1.0, 0.5]), counts)
    # 3 and 4 follow item 1 (weight 1), 2 follows item 0 (weight 0.5); tie 3 vs 4 -> more popular 4
    assert items.tolist() == [4, 3, 2]
    assert scores.tolist() == pytest.approx([1.0, 1.0, 0.5])


def test_popularity_table_global_and_per_category() -> None:
    counts = np.array([5, 1, 7, 3, 0])
    category = np.array([0, 1, 0, 1, -1])
    table = PopularityTable.build(counts, category, num_categories=2)
    assert table.ranked().tolist() == [2, 0, 3, 1, 4]
    assert table.ranked(0).tolist() == [2, 0]
    assert table.ranked(1).tolist() == [3, 1]
    assert table.scores(np.array([2, 4])).tolist() == pytest.approx([1.0, 0.0])


def reference_covisit_candidates(table, anchors, weights, counts) -> tuple[np.ndarray, np.ndarray]:
    """The definition with NumPy: rows concatenated, summed per item in float64, best first."""
    rows = [table.row(int(a)) for a in anchors if 0 <= a < table.num_items]
    items = np.concatenate([r[0] for r in rows] + [np.zeros(0, np.int64)])
    scores = np.concatenate([r[1] * np.float64(w) for r, w in zip(rows, weights, strict=False)] + [[]])
    unique_items, inverse = np.unique(items, return_inverse=True)
    summed = np.bincount(inverse, weights=scores, minlength=len(unique_items)).astype(np.float32)
    order = np.lexsort((unique_items, -counts[unique_items], -summed))
    return unique_items[order], summed[order]


def test_covisit_candidates_equal_their_definition_bit_for_bit() -> None:
    rng = np.random.default_rng(5)
    num_items = 300
    sequences = [rng.integers(0, num_items, int(rng.integers(2, 20))) for _ in range(800)]
    table = build_covisit_table(sequences, num_items, top_m=40)
    counts = np.bincount(np.concatenate(sequences), minlength=num_items)
    for case in range(300):
        anchors = rng.integers(0, num_items, int(rng.integers(0, 12)))
        weights = rng.random(len(anchors))
        items, scores = covisit_candidates(table, anchors, weights, counts)
        expected_items, expected_scores = reference_covisit_candidates(table, anchors, weights, counts)
        assert items.dtype == np.int64 and scores.dtype == np.float32
        assert np.array_equal(items, expected_items) and np.array_equal(scores, expected_scores), case
