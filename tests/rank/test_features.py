"""Feature building shared by training and serving."""

from __future__ import annotations

import numpy as np

from rank_service.features import (
    NUM_CANDIDATE_FEATURES,
    PER_SOURCE_FEATURES,
    SOURCES,
    candidate_features,
    history_inputs,
    pack_batch,
)
from recsys.data.dataset import EventType


def test_candidate_features_rank_within_each_source_and_mark_absent_sources():
    scores = np.array([[0.9, 0, 0, 0], [0.5, 0, 2.0, 0], [0.1, 0, 4.0, 0]], dtype=np.float32)
    mask = np.array([[1, 0, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0]], dtype=bool)
    features = candidate_features(scores.max(axis=1), scores, mask)
    assert features.shape == (3, NUM_CANDIDATE_FEATURES)
    u2i, covisit = 0, SOURCES.index("covisit") * PER_SOURCE_FEATURES
    assert list(features[:, u2i]) == [1, 1, 1]
    assert list(features[:, u2i + 2]) == [1.0, 0.5, 1 / 3]  # reciprocal rank by score
    assert list(features[:, covisit]) == [0, 1, 1]
    assert features[0, covisit : covisit + PER_SOURCE_FEATURES].tolist() == [0] * PER_SOURCE_FEATURES
    assert features[2, covisit + 2] == 1.0 and features[1, covisit + 2] == 0.5
    assert features[2, covisit + 1] > 0 > features[1, covisit + 1]  # z-score within the request
    assert features[2, covisit + 4] == 0.0 and np.isclose(features[1, covisit + 4], -np.log(2.0))


def test_candidate_features_do_not_depend_on_order():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, len(SOURCES))).astype(np.float32)
    mask = rng.random((6, len(SOURCES))) < 0.6
    recall = scores.max(axis=1)
    permutation = rng.permutation(6)
    forward = candidate_features(recall, scores, mask)
    shuffled = candidate_features(recall[permutation], scores[permutation], mask[permutation])
    assert np.allclose(forward[permutation], shuffled)


def reference_features(recall: np.ndarray, scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The candidate features written out per source and per candidate (the definition)."""
    n = len(recall)
    rows = np.zeros((n, NUM_CANDIDATE_FEATURES), dtype=np.float64)
    for column in range(len(SOURCES)):
        present = np.flatnonzero(mask[:, column])
        values = scores[present, column].astype(np.float64)
        mean, spread = (values.mean(), values.std()) if len(values) else (0.0, 0.0)
        by_score = sorted(present, key=lambda row: (-scores[row, column], row))  # ties: position
        for rank, row in enumerate(by_score):
            score = float(scores[row, column])
            z = (score - mean) / spread if len(values) > 1 and spread > 0 else 0.0
            base = column * PER_SOURCE_FEATURES
            signed = np.sign(score) * np.log1p(abs(score))
            rows[row, base : base + PER_SOURCE_FEATURES] = [1.0, z, 1 / (1 + rank), signed, -np.log1p(rank)]
    rows[:, -2] = np.sign(recall) * np.log1p(np.abs(recall))
    rows[:, -1] = mask.mean(axis=1)
    return np.nan_to_num(rows, nan=0.0, posinf=0.0, neginf=0.0)


def test_candidate_features_match_their_definition_with_ties_lone_sources_and_infinite_scores():
    rng = np.random.default_rng(3)
    for case in range(60):
        n = int(rng.integers(0, 40))
        scores = (rng.normal(size=(n, len(SOURCES))) * [1, 10, 100, 0.1]).astype(np.float32)
        if case % 3 == 1:
            scores = np.round(scores)  # ties
        mask = rng.random((n, len(SOURCES))) < rng.random()
        if case % 3 == 2 and n:
            mask[:, 0] = False
            mask[0, 0] = True  # a source with one candidate: no spread, z-score 0
            scores[rng.random(scores.shape) < 0.1] = np.inf
            scores[rng.random(scores.shape) < 0.1] = np.nan
        recall = np.where(mask, np.nan_to_num(scores), 0).max(axis=1, initial=0).astype(np.float32)
        with np.errstate(invalid="ignore"):
            features = candidate_features(recall, scores, mask)
            expected = reference_features(recall, scores, mask)
        assert features.dtype == np.float32 and features.shape == (n, NUM_CANDIDATE_FEATURES)
        assert np.isfinite(features).all()
        finite = np.isfinite(scores).all()
        if finite:  # with an infinite score the z-scores of its source are NaN -> 0 either way
            assert np.allclose(features, expected, rtol=1e-5, atol=1e-5), case


def test_history_inputs_drop_unknown_items_keep_the_most_recent_and_read_unspecified_as_view():
    items, events = history_inputs(np.array([5, -1, 6, 7, 8]), np.array([0, 1, 2, 3, 4]), max_history=3)
    assert items.tolist() == [7, 8, 9]  # dense + 1
    assert events.tolist() == [2, 3, 4]
    items, events = history_inputs(np.array([5]), np.array([EventType.UNSPECIFIED]), max_history=3)
    assert events.tolist() == [EventType.VIEW]
    items, events = history_inputs(np.zeros(0, np.int64), None, max_history=3)
    assert items.size == 0 and events.size == 0


def test_pack_batch_pads_right_and_maps_unknown_candidates_to_padding():
    histories = [(np.array([3, 4]), np.array([1, 1])), (np.zeros(0, np.int64), np.zeros(0, np.int64))]
    features = [
        np.ones((3, NUM_CANDIDATE_FEATURES), np.float32),
        np.ones((1, NUM_CANDIDATE_FEATURES), np.float32),
    ]
    batch = pack_batch(histories, [0, 2], [np.array([0, -1, 5]), np.array([7])], features)
    assert batch.history.tolist() == [[3, 4], [0, 0]]
    assert batch.candidates.tolist() == [[1, 0, 6], [8, 0, 0]]
    assert batch.candidate_counts.tolist() == [3, 1]
    assert not batch.candidate_features[1, 1:].any()
    empty = pack_batch(histories[1:], [0], [np.array([1])], features[1:])
    assert empty.history.shape == (1, 1)  # at least one (padding) column: ORT rejects width 0
