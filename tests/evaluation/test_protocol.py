"""The shared protocol on hand-computed cases: ranks, pessimistic ties, history, NDCG, lists."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.data.dataset import Dataset, IdMap, ItemCatalog
from recsys.data.split import LeaveOneOutSplit
from recsys.evaluation.protocol import (
    DEFAULT_KS,
    evaluate_lists,
    evaluate_scorer,
    metrics_from_ranks,
    ranks_from_lists,
    target_ranks,
)


def _ranks(scores: list[list[float]], targets: list[int], histories: list[list[int]] | None = None) -> list:
    histories = histories or [[] for _ in targets]
    return target_ranks(
        np.array(scores, dtype=np.float32),
        np.array(targets),
        [np.array(h, dtype=np.int64) for h in histories],
    ).tolist()


def test_rank_counts_items_scoring_higher() -> None:
    assert _ranks([[3, 1, 2, 0]], [2]) == [1.0]
    assert _ranks([[3, 1, 2, 0]], [0]) == [0.0]
    assert _ranks([[3, 1, 2, 0]], [3]) == [3.0]


def test_ties_are_pessimistic() -> None:
    # Every item scoring the target's score ranks above it: a constant scorer ranks last.
    assert _ranks([[1, 1, 1, 1]], [0]) == [3.0]
    assert _ranks([[2, 5, 5, 5, 1]], [2]) == [2.0]
    assert _ranks([[2, 5, 5, 5, 1]], [0]) == [3.0]


def test_history_is_excluded() -> None:
    assert _ranks([[5, 4, 3]], [2], [[0]]) == [1.0]
    assert _ranks([[5, 4, 3]], [2], [[0, 1]]) == [0.0]
    # Excluded items that tie with the target no longer count against it.
    assert _ranks([[3, 3, 3, 1]], [2], [[0, 1]]) == [0.0]


def test_history_exclusion_modifies_scores_in_place() -> None:
    scores = np.array([[5, 4, 3]], dtype=np.float32)
    target_ranks(scores, np.array([2]), [np.array([0])])
    assert scores[0, 0] == -np.inf and scores[0, 2] == 3


def test_non_finite_target_score_ranks_last() -> None:
    assert _ranks([[1, np.nan, 0]], [1]) == [3.0]
    assert _ranks([[1, -np.inf, 0]], [1]) == [3.0]


def test_target_inside_its_history_never_hits() -> None:
    assert _ranks([[5, 4, 3]], [1], [[1]]) == [3.0]


def test_rows_are_independent() -> None:
    assert _ranks([[0, 1, 2], [2, 1, 0]], [0, 0], [[], [1]]) == [2.0, 0.0]


def test_ranks_from_lists() -> None:
    lists = [np.array([4, 2, 7]), np.array([1, 3]), np.array([], dtype=np.int64), np.array([5, 5, 9])]
    ranks = ranks_from_lists(lists, np.array([7, 8, 1, 5]))
    assert ranks.tolist() == [2.0, math.inf, math.inf, 0.0]


def test_metrics_from_ranks_hand_computed() -> None:
    ranks = np.array([0, 1, 9, 10, np.inf])
    metrics = metrics_from_ranks(ranks, ks=(1, 10))
    assert metrics["HR@1"] == pytest.approx(1 / 5)
    assert metrics["NDCG@1"] == pytest.approx(1 / 5)
    assert metrics["HR@10"] == pytest.approx(3 / 5)
    assert metrics["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert metrics["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 5)
    assert metrics["users"] == 5
    assert set(metrics_from_ranks(np.array([0.0]))) == {
        *(f"{name}@{k}" for k in DEFAULT_KS for name in ("HR", "NDCG")),
        "MRR",
        "users",
    }
    with pytest.raises(ValueError, match="no users"):
        metrics_from_ranks(np.array([]))


def _dataset(sequences: list[list[int]], num_items: int) -> Dataset:
    return Dataset(
        name="hand",
        users=IdMap(f"u{u}" for u in range(len(sequences))),
        items=IdMap(f"i{i}" for i in range(num_items)),
        sequences=[np.array(s, dtype=np.int64) for s in sequences],
        catalog=ItemCatalog(attributes=[np.zeros(0, dtype=np.int64) for _ in range(num_items)]),
    )


@pytest.fixture
def hand_split() -> LeaveOneOutSplit:
    # u0: history [0, 1], valid 2, test 3; u1: history [4], valid 0, test 1; u2 too short (train only).
    return LeaveOneOutSplit(_dataset([[0, 1, 2, 3], [4, 0, 1], [2, 3]], num_items=6))


def test_split_targets_and_histories(hand_split: LeaveOneOutSplit) -> None:
    assert hand_split.eval_users.tolist() == [0, 1]
    assert hand_split.history(0, "test").tolist() == [0, 1, 2]
    assert hand_split.history(0, "valid").tolist() == [0, 1]
    assert hand_split.targets(np.array([0, 1]), "test").tolist() == [3, 1]
    assert hand_split.targets(np.array([0, 1]), "valid").tolist() == [2, 0]
    assert hand_split.train_sequence(2).tolist() == [2, 3]
    assert hand_split.item_counts_without_test().tolist() == [2, 1, 2, 1, 1, 0]


def test_evaluate_scorer_hand_computed(hand_split: LeaveOneOutSplit) -> None:
    fixed = np.array([6, 5, 4, 3, 2, 1], dtype=np.float32)  # item 0 best, item 5 worst

    def scorer(users: np.ndarray, phase: str) -> np.ndarray:
        return np.tile(fixed, (len(users), 1))

    # test: u0 target 3, history {0,1,2} excluded -> rank 0; u1 target 1, history {4,0} -> rank 0.
    test = evaluate_scorer(scorer, hand_split, phase="test", ks=(1,))
    assert test["HR@1"] == 1.0 and test["MRR"] == 1.0 and test["users"] == 2
    # valid: u0 target 2, history {0,1} -> rank 0; u1 target 0, history {4} -> rank 0.
    assert evaluate_scorer(scorer, hand_split, phase="valid", ks=(1,))["HR@1"] == 1.0

    reversed_scores = fixed[::-1].copy()  # item 5 best
    metrics = evaluate_scorer(
        lambda users, phase: np.tile(reversed_scores, (len(users), 1)), hand_split, ks=(2,)
    )
    # u0 target 3: above it 5, 4 (history 0,1,2 excluded) -> rank 2; u1 target 1: 5, 3, 2 -> rank 3.
    assert metrics["HR@2"] == 0.0
    assert metrics["MRR"] == pytest.approx((1 / 3 + 1 / 4) / 2)


def test_constant_scorer_scores_zero_and_oracle_scores_one(hand_split: LeaveOneOutSplit) -> None:
    constant = evaluate_scorer(
        lambda users, phase: np.zeros((len(users), 6), np.float32), hand_split, ks=(1, 2)
    )
    # Ranked below every non-history item: u0 has 2 others (rank 2), u1 has 3 (rank 3).
    assert constant["HR@1"] == 0.0 and constant["HR@2"] == 0.0
    assert constant["MRR"] == pytest.approx((1 / 3 + 1 / 4) / 2)

    def oracle(users: np.ndarray, phase: str) -> np.ndarray:
        scores = np.zeros((len(users), 6), np.float32)
        scores[np.arange(len(users)), hand_split.targets(users, phase)] = 1.0
        return scores

    assert evaluate_scorer(oracle, hand_split)["NDCG@10"] == 1.0


def test_batch_size_does_not_change_results(synthetic_dataset) -> None:
    split = LeaveOneOutSplit(synthetic_dataset)
    rng = np.random.default_rng(0)
    fixed = rng.random(synthetic_dataset.num_items).astype(np.float32)

    def scorer(users: np.ndarray, phase: str) -> np.ndarray:
        return np.tile(fixed, (len(users), 1)) + users[:, None].astype(np.float32) * 1e-3

    assert evaluate_scorer(scorer, split, batch_size=7) == evaluate_scorer(scorer, split, batch_size=512)


def test_evaluate_lists_hand_computed(hand_split: LeaveOneOutSplit) -> None:
    lists = {0: np.array([5, 3]), 1: np.array([4, 2])}  # u1's target (1) is absent -> never hits

    metrics = evaluate_lists(lambda users, phase: [lists[int(u)] for u in users], hand_split, ks=(1, 2))
    assert metrics["HR@1"] == 0.0
    assert metrics["HR@2"] == 0.5
    assert metrics["NDCG@2"] == pytest.approx((1 / math.log2(3)) / 2)
    assert metrics["MRR"] == pytest.approx(0.25)


def test_evaluate_lists_agrees_with_scorer_on_full_lists(synthetic_dataset) -> None:
    split = LeaveOneOutSplit(synthetic_dataset)
    fixed = np.random.default_rng(1).permutation(synthetic_dataset.num_items).astype(np.float32)

    def scorer(users: np.ndarray, phase: str) -> np.ndarray:
        return np.tile(fixed, (len(users), 1))

    def lists(users: np.ndarray, phase: str) -> list[np.ndarray]:
        ranked = np.argsort(-fixed)
        return [ranked[~np.isin(ranked, split.history(int(u), phase))] for u in users]

    assert evaluate_lists(lists, split) == pytest.approx(evaluate_scorer(scorer, split))
