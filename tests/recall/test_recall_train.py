"""Training data of the two towers: every prefix, right-aligned targets, no validation/test items."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from recall_service.train import build_training_windows
from recsys.data.split import LeaveOneOutSplit


def test_windows_cover_every_training_prefix_and_never_a_held_out_item(make_dataset) -> None:
    dataset = make_dataset([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], num_items=10)
    windows = build_training_windows(dataset, LeaveOneOutSplit(dataset), max_length=4)
    # user 0 trains on 0 1 2 (3 and 4 are validation and test); user 1 (too short) on 5 6; user 2 on 7
    assert windows.lengths.tolist() == [2, 1, 0]
    # items are +1 ids, left-padded; targets right-aligned with the outputs (start token first)
    np.testing.assert_array_equal(windows.items[0], [0, 0, 1, 2])
    np.testing.assert_array_equal(windows.targets[0], [0, 0, 1, 2, 3])
    np.testing.assert_array_equal(windows.items[1], [0, 0, 0, 6])
    np.testing.assert_array_equal(windows.targets[1], [0, 0, 0, 6, 7])
    np.testing.assert_array_equal(windows.targets[2], [0, 0, 0, 0, 8])
    held_out = {3 + 1, 4 + 1, 8 + 1, 9 + 1}  # +1 ids of the validation and test items 3, 4, 8, 9
    assert not held_out & set(windows.targets.ravel().tolist()) - {0}
    assert not held_out & set(windows.items.ravel().tolist())


def test_long_sequences_are_cut_into_windows_that_keep_every_target(make_dataset) -> None:
    sequence = list(range(14))  # 12 training items, then validation (12) and test (13)
    dataset = make_dataset([sequence], num_items=14)
    windows = build_training_windows(dataset, LeaveOneOutSplit(dataset), max_length=4)
    targets = windows.targets[windows.targets > 0] - 1
    assert sorted(targets.tolist()) == list(range(12))
    # only the window that starts the sequence trains the start token (empty history)
    starts = [
        row for row in range(len(windows.lengths)) if windows.targets[row, -(windows.lengths[row] + 1)] > 0
    ]
    assert len(starts) == 1


def test_refit_windows_add_the_validation_item_but_never_the_test_item(make_dataset) -> None:
    dataset = make_dataset([[0, 1, 2, 3, 4], [5, 6]], num_items=7)
    windows = build_training_windows(
        dataset, LeaveOneOutSplit(dataset), max_length=4, include_validation=True
    )
    targets = set((windows.targets[windows.targets > 0] - 1).tolist())
    assert targets == {0, 1, 2, 3, 5, 6}  # 3 is user 0's validation item; 4 (test) stays out
