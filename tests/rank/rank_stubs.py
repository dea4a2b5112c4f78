"""A deterministic stub candidate source for rank tests that must not depend on the recall
bundle."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rank_service.candidates import Candidates
from rank_service.features import SOURCES
from recsys.data.dataset import Dataset
from recsys.data.split import LeaveOneOutSplit

COVISIT, POPULAR = SOURCES.index("covisit"), SOURCES.index("popular")


class StubCandidates:
    """Co-visitation of the last item (next items in training sequences), then popularity."""

    version = "stub"

    def __init__(self, dataset: Dataset):
        split = LeaveOneOutSplit(dataset)
        self.num_items = dataset.num_items
        self.counts = np.zeros(dataset.num_items, dtype=np.float32)
        self.following = np.zeros((dataset.num_items, dataset.num_items), dtype=np.float32)
        for user in range(dataset.num_users):
            train = split.train_sequence(user)
            np.add.at(self.counts, train, 1.0)
            np.add.at(self.following, (train[:-1], train[1:]), 1.0)
        self.popular_order = np.argsort(-self.counts, kind="stable")

    def generate(
        self, histories: Sequence[np.ndarray], events: Sequence[np.ndarray], scenarios: Sequence[str], k: int
    ) -> list[Candidates]:
        results = []
        for history in histories:
            covisit = self.following[history[-1]] if len(history) else np.zeros(self.num_items, np.float32)
            covisit_items = [int(i) for i in np.argsort(-covisit, kind="stable") if covisit[i] > 0]
            seen = set(int(i) for i in history)
            items: list[int] = []
            for item in [*covisit_items, *self.popular_order.tolist()]:
                if item not in seen and item not in items:
                    items.append(item)
                if len(items) == k:
                    break
            chosen = np.asarray(items, dtype=np.int64)
            source_scores = np.zeros((len(chosen), len(SOURCES)), dtype=np.float32)
            source_mask = np.zeros((len(chosen), len(SOURCES)), dtype=bool)
            source_scores[:, COVISIT] = covisit[chosen]
            source_mask[:, COVISIT] = covisit[chosen] > 0
            source_scores[:, POPULAR] = self.counts[chosen]
            source_mask[:, POPULAR] = ~source_mask[:, COVISIT]
            scores = np.where(source_mask[:, COVISIT], source_scores[:, COVISIT], source_scores[:, POPULAR])
            results.append(Candidates(chosen, scores.astype(np.float32), source_scores, source_mask))
        return results
