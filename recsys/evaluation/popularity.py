"""Popularity baseline: items ranked by how often they were seen, without leaking the targets.

On Amazon Beauty, counts over everything except each user's test item, history excluded and
pessimistic ties give HR@10 0.0130 / NDCG@10 0.0059 (see ../shared/data/amazon-beauty/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.data.dataset import Dataset
from recsys.data.split import LeaveOneOutSplit, Phase
from recsys.evaluation.protocol import DEFAULT_KS, evaluate_scorer


def popularity_table(dataset: Dataset, split: LeaveOneOutSplit, phase: Phase = "test") -> np.ndarray:
    """Interactions per item (int64, [num_items]) over what may be seen before ``phase``'s targets.

    ``"test"``: everything except each evaluated user's test item (the validation item counts);
    ``"valid"``: training items only (validation and test items left out). Users with fewer than
    3 interactions are training-only, so all their items count.
    """
    if phase == "test":
        return split.item_counts_without_test()
    counts = np.zeros(dataset.num_items, dtype=np.int64)
    for user in range(dataset.num_users):
        np.add.at(counts, split.train_sequence(user), 1)
    return counts


def top_items_by_category(dataset: Dataset, counts: np.ndarray, k: int) -> dict[int, np.ndarray]:
    """The ``k`` most popular items of each category (dense category id -> dense item ids, most
    popular first, ties by item id). Empty when the catalog has no categories."""
    category = dataset.catalog.category
    if category is None:
        return {}
    counts = np.asarray(counts)
    order = np.lexsort((np.arange(len(counts)), -counts))  # count descending, then item id
    ranked_categories = category[order]
    return {int(c): order[ranked_categories == c][:k] for c in range(len(dataset.catalog.category_names))}


def evaluate_popularity(
    dataset: Dataset,
    split: LeaveOneOutSplit | None = None,
    phase: Phase = "test",
    ks: Sequence[int] = DEFAULT_KS,
    progress: bool = False,
) -> dict[str, float]:
    """Full-ranking metrics of the popularity scorer under the shared protocol."""
    split = split or LeaveOneOutSplit(dataset)
    scores = popularity_table(dataset, split, phase).astype(np.float32)

    def score_users(users: np.ndarray, _phase: Phase) -> np.ndarray:
        return np.broadcast_to(scores, (len(users), len(scores))).copy()

    return evaluate_scorer(score_users, split, phase=phase, ks=ks, progress=progress)
