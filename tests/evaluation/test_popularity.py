"""Popularity baseline: leak-free counts, per-category tops, and the Beauty reproduction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.data.dataset import Dataset, IdMap, ItemCatalog
from recsys.data.loaders import load_dataset
from recsys.data.split import LeaveOneOutSplit
from recsys.evaluation.popularity import evaluate_popularity, popularity_table, top_items_by_category


def _dataset(sequences: list[list[int]], categories: list[int] | None = None) -> Dataset:
    num_items = 1 + max(max(s) for s in sequences)
    return Dataset(
        name="hand",
        users=IdMap(f"u{u}" for u in range(len(sequences))),
        items=IdMap(f"i{i}" for i in range(num_items)),
        sequences=[np.array(s, dtype=np.int64) for s in sequences],
        catalog=ItemCatalog(
            attributes=[np.zeros(0, dtype=np.int64) for _ in range(num_items)],
            category=None if categories is None else np.array(categories),
            category_names=[] if categories is None else [f"c{c}" for c in sorted(set(categories))],
        ),
    )


def test_counts_leave_out_the_phase_targets() -> None:
    dataset = _dataset([[0, 1, 2, 3], [1, 2, 0], [3, 4]])  # u2 is train-only: both items count
    split = LeaveOneOutSplit(dataset)
    assert popularity_table(dataset, split, "test").tolist() == [1, 2, 2, 1, 1]  # valid items count
    assert popularity_table(dataset, split, "valid").tolist() == [1, 2, 0, 1, 1]  # neither target


def test_top_items_by_category() -> None:
    dataset = _dataset([[0, 1, 2, 3, 4, 5]], categories=[0, 1, 0, 1, 0, 1])
    counts = np.array([5, 1, 7, 1, 5, 0])
    tops = top_items_by_category(dataset, counts, k=2)
    assert tops[0].tolist() == [2, 0]  # 7, then the 5-5 tie broken by item id
    assert tops[1].tolist() == [1, 3]
    assert top_items_by_category(_dataset([[0, 1, 2]]), np.ones(3), k=2) == {}


def test_popularity_ranks_by_counts_with_history_excluded() -> None:
    # Item 0 is the most popular; u0's test target (0) is first when its history skips nothing.
    dataset = _dataset([[1, 2, 0], [3, 0, 2, 1], [0, 3, 4], [0, 2]])
    split = LeaveOneOutSplit(dataset)
    # test counts: item0: 1 (u1) + 1 (u2) + 1 (u3) = 3; item1: 1; item2: 1 + 1 + 1 = 3; item3: 2; item4: 0
    assert popularity_table(dataset, split).tolist() == [3, 1, 3, 2, 0]
    metrics = evaluate_popularity(dataset, split, ks=(1, 2))
    # u0 target 0, history {1,2}: others >= 3: none -> rank 0.
    # u1 target 1 (count 1), history {3,0,2}: item 4 has 0 -> rank 0.
    # u2 target 4 (count 0), history {0,3}: items 1, 2 -> rank 2.
    assert metrics["HR@1"] == pytest.approx(2 / 3)
    assert metrics["MRR"] == pytest.approx((1 + 1 + 1 / 3) / 3)


def test_reproduces_beauty_poprec(beauty_dir: Path) -> None:
    metrics = evaluate_popularity(load_dataset(beauty_dir))
    assert metrics["users"] == 22_363
    assert metrics["HR@10"] == pytest.approx(0.0130, abs=0.0003)
    assert metrics["NDCG@10"] == pytest.approx(0.0059, abs=0.0003)
    # Not the leaky published row (0.0152 / 0.0068), which also counted the test items.
    assert metrics["HR@10"] < 0.0145
