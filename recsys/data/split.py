"""Leave-one-out split, the one protocol used everywhere (see ../shared/data/amazon-beauty/README.md).

Per user: the last item is the test target, the second-to-last the validation target, everything
before is training history. Users with fewer than 3 interactions are training-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from recsys.data.dataset import Dataset

Phase = Literal["valid", "test"]

EVALUATED_LENGTH = 3  # shorter sequences have no validation or test item: training sees all of them


@dataclass
class LeaveOneOutSplit:
    dataset: Dataset

    def __post_init__(self) -> None:
        lengths = np.array([len(s) for s in self.dataset.sequences], dtype=np.int64)
        self.eval_users: np.ndarray = np.flatnonzero(lengths >= EVALUATED_LENGTH)

    def train_length(self, user: int) -> int:
        """Number of leading items of the user's sequence that training may see."""
        n = len(self.dataset.sequences[user])
        return n - 2 if n >= EVALUATED_LENGTH else n

    def train_sequence(self, user: int) -> np.ndarray:
        return self.dataset.sequences[user][: self.train_length(user)]

    def history(self, user: int, phase: Phase) -> np.ndarray:
        """Items the user had before the ``phase`` target (all excluded from ranking)."""
        sequence = self.dataset.sequences[user]
        return sequence[:-2] if phase == "valid" else sequence[:-1]

    def target(self, user: int, phase: Phase) -> int:
        sequence = self.dataset.sequences[user]
        return int(sequence[-2] if phase == "valid" else sequence[-1])

    def targets(self, users: np.ndarray, phase: Phase) -> np.ndarray:
        return np.array([self.target(int(u), phase) for u in users], dtype=np.int64)

    def item_counts_without_test(self) -> np.ndarray:
        """Interactions per item over everything except each user's test item (no leak)."""
        counts = np.zeros(self.dataset.num_items, dtype=np.int64)
        for sequence in self.dataset.sequences:
            visible = sequence[:-1] if len(sequence) >= EVALUATED_LENGTH else sequence
            np.add.at(counts, visible, 1)
        return counts
