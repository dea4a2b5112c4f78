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


def test_recency_boost_weighs_each_users_newest_training_targets_most(make_dataset) -> None:
    sequence = list(range(14))  # 12 training targets, cut into several windows
    dataset = make_dataset([sequence, [20, 21, 22, 23, 24]], num_items=25)
    split = LeaveOneOutSplit(dataset)
    assert build_training_windows(dataset, split, max_length=4).weights is None
    windows = build_training_windows(dataset, split, max_length=4, recency_boost=2.0, recency_decay=0.5)
    by_target = {
        int(t) - 1: float(w)
        for t, w in zip(windows.targets.ravel(), windows.weights.ravel(), strict=True)
        if t > 0
    }
    assert by_target[11] == 3.0 and by_target[10] == 2.0 and by_target[9] == 1.5  # ages 0, 1, 2
    assert by_target[22] == 3.0 and by_target[21] == 2.0  # every user's newest target: age 0
    assert 1.0 < by_target[0] < 1.001


def test_full_softmax_is_plain_cross_entropy_over_every_item(make_dataset) -> None:
    import torch
    import torch.nn.functional as F

    from recall_service.model import TwoTowerModel, TwoTowerShape
    from recall_service.train import SampledSoftmaxLoss, weighted_mean

    torch.manual_seed(0)
    shape = TwoTowerShape(num_items=30, num_attributes=3, max_attributes=1, num_scenarios=1, dim=8, layers=1)
    model = TwoTowerModel(shape, np.zeros((31, 1), dtype=np.int64)).eval()
    users = F.normalize(torch.randn(5, 8), dim=-1)
    positives = torch.tensor([1, 4, 4, 9, 30])
    loss = SampledSoftmaxLoss(np.ones(30), uniform_negatives=30, rng=np.random.default_rng(0))
    expected = F.cross_entropy(model.item_logits(users, torch.arange(1, 31)), positives - 1)
    torch.testing.assert_close(loss(model, users, positives), expected)
    # weights: all ones change nothing; a zero weight drops that example
    torch.testing.assert_close(loss(model, users, positives, torch.ones(5)), expected)
    each = F.cross_entropy(model.item_logits(users, torch.arange(1, 31)), positives - 1, reduction="none")
    torch.testing.assert_close(
        loss(model, users, positives, torch.tensor([1.0, 1, 1, 1, 0])), weighted_mean(each[:4], None)
    )


def test_weight_average_follows_the_model_at_its_decay() -> None:
    import torch

    from recall_service.train import WeightAverage

    model = torch.nn.Linear(2, 2)
    average = WeightAverage(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    average.update()
    torch.testing.assert_close(average.state_dict(model)["weight"], start + 1.0)  # 0.75 old + 0.25 new
    torch.testing.assert_close(model.weight, start + 4.0)  # the live weights are untouched
    # Training swaps the averaged weights in for validation and back (load_state_dict, in place):
    # the average keeps following the live weights afterwards.
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(average.state_dict(model))
    model.load_state_dict(live)
    average.update()
    torch.testing.assert_close(average.state_dict(model)["weight"], start + 1.75)


def test_id_dropout_only_touches_training_item_vectors() -> None:
    import torch

    from recall_service.model import TwoTowerModel, TwoTowerShape

    torch.manual_seed(0)
    shape = TwoTowerShape(
        num_items=6, num_attributes=4, max_attributes=2, num_scenarios=1, dim=8, layers=1, id_dropout=1.0
    )
    attributes = np.array([[0, 0], [1, 2], [2, 0], [3, 4], [1, 0], [4, 0], [2, 3]])
    model = TwoTowerModel(shape, attributes)
    items = torch.arange(1, 7)
    model.train()
    attributes_only = model.item_features(items) - model.item_embedding(items)
    torch.testing.assert_close(
        model.item_vectors(items), torch.nn.functional.normalize(attributes_only, dim=-1)
    )
    model.eval()  # serving and export: the id embedding is always there
    torch.testing.assert_close(
        model.item_vectors(items), torch.nn.functional.normalize(model.item_features(items), dim=-1)
    )
