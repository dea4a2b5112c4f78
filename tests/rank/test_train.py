"""Training lists come from the candidate source, hold the target, and never use a validation or
test item; the pipeline metric puts the ranker's order on the recall list."""

from __future__ import annotations

import numpy as np
import pytest
from rank_stubs import StubCandidates

from rank_service.candidates import Candidates
from rank_service.train import RankTrainConfig, pipeline_metrics, training_lists
from recsys.data.split import LeaveOneOutSplit


def test_training_lists_hold_the_target_and_only_training_items(synthetic_dataset):
    split = LeaveOneOutSplit(synthetic_dataset)
    config = RankTrainConfig.tiny()
    lists = training_lists(synthetic_dataset, split, StubCandidates(synthetic_dataset), config)
    assert len(lists.users) > 0
    for user, cut, candidates, position in zip(
        lists.users, lists.cuts, lists.lists, lists.target_positions, strict=True
    ):
        assert 1 <= cut < split.train_length(int(user))  # history and target inside training data
        target = synthetic_dataset.sequences[user][cut]
        assert candidates.items[position] == target
        assert len(candidates.items) <= config.train_candidates
        assert len(np.unique(candidates.items)) == len(candidates.items)


def test_pipeline_metrics_rank_by_the_scorer_and_miss_targets_outside_the_list(synthetic_dataset):
    split = LeaveOneOutSplit(synthetic_dataset)
    users = split.eval_users[:2]
    targets = split.targets(users, "valid")
    empty = np.zeros((3, 4), np.float32)
    lists = [
        Candidates(
            np.array([targets[0] + 1000, targets[0], targets[0] + 2000]), np.zeros(3), empty, empty > 0
        ),
        Candidates(
            np.array([targets[1] + 1000, targets[1] + 2000, targets[1] + 3000]), np.zeros(3), empty, empty > 0
        ),
    ]

    def target_first(histories, events, scenarios, candidate_lists):
        return [np.isin(c.items, targets).astype(np.float32) for c in candidate_lists]

    metrics = pipeline_metrics(synthetic_dataset, split, "valid", users, lists, target_first, ks=(1,))
    assert metrics["HR@1"] == 0.5 and metrics["users"] == 2


def test_holdout_dataset_keeps_only_training_items(synthetic_dataset):
    from rank_service.train import holdout_dataset

    split = LeaveOneOutSplit(synthetic_dataset)
    holdout = holdout_dataset(synthetic_dataset, split)
    for user in range(synthetic_dataset.num_users):
        train = split.train_sequence(user)
        assert np.array_equal(holdout.sequences[user], train)
        assert len(holdout.events_of(user)) == len(train)
    # The recall bundle built from it also leaves out each sequence's last item: the last
    # training item (the ranker's target) of every evaluated user is never in its tables.
    held_out = LeaveOneOutSplit(holdout)
    for user in split.eval_users:
        train = split.train_sequence(int(user))
        assert np.array_equal(held_out.history(int(user), "test"), train[:-1])


def test_rank_bundle_manifest_records_the_training_run(rank_bundle, recall_bundle, tmp_path):
    """The manifest says what stopped training, epochs, seconds, threads and seed, and the eval
    JSON's ``training`` block copies it from the bundles it evaluated."""
    import json

    from recsys.app.eval import training_records
    from recsys.training import STOP_REASONS

    train = json.loads((rank_bundle / "manifest.json").read_text())["train"]
    assert train["stop_reason"] in STOP_REASONS
    assert 1 <= train["best_epoch"] <= train["epochs_run"] <= train["config"]["epochs"]
    assert train["threads"] >= 1 and train["processes"] == 1
    assert train["seed"] == train["config"]["seed"] == 7
    (tmp_path / "recall").symlink_to(recall_bundle)
    (tmp_path / "rank").symlink_to(rank_bundle)
    records = training_records(tmp_path)
    assert records["rank"]["stop_reason"] == train["stop_reason"]
    assert records["rank"]["seed"] == 7 and records["recall"]["seed"] == 7
    assert set(records["recall"]) >= {"stop_reason", "epochs_run", "best_epoch", "train_seconds", "threads"}


def test_default_training_has_no_minutes_scale_clock():
    """Work budgets (epochs, patience); the wall clock is only an hours-scale guard, and the
    held-out recall bundle is trained like the served one (no clock of its own)."""
    from recall_service.train import RecallTrainConfig

    for config in (RankTrainConfig.default(), RecallTrainConfig.default()):
        assert config.time_guard_s >= 3600 and config.threads == 0
    assert not hasattr(RankTrainConfig(), "holdout_recall_time_limit_s")


@pytest.mark.gpu
def test_rank_training_finds_the_gpu(synthetic_dataset):
    import dataclasses

    import torch

    from rank_service.train import train_model

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    config = dataclasses.replace(RankTrainConfig.tiny(), epochs=1)
    result = train_model(synthetic_dataset, StubCandidates(synthetic_dataset), config)
    assert result.run["device"] == "cuda" and result.run["precision"] == "bf16"
    assert next(result.model.parameters()).device.type == "cpu"


def test_weight_average_is_what_training_validates_and_keeps(synthetic_dataset):
    """With a weight average the kept model is the average, not the live weights: at decay 1 the
    average never leaves the initial weights, whatever the optimizer does."""
    import dataclasses

    import torch

    from rank_service.train import build_model, train_model

    config = dataclasses.replace(RankTrainConfig.tiny(), epochs=2, weight_average_decay=1.0)
    result = train_model(synthetic_dataset, StubCandidates(synthetic_dataset), config)
    torch.manual_seed(config.seed)
    initial = build_model(synthetic_dataset, LeaveOneOutSplit(synthetic_dataset), config).state_dict()
    kept = result.model.state_dict()
    assert kept.keys() == initial.keys()
    for name, weights in initial.items():
        torch.testing.assert_close(kept[name], weights, msg=name)
    live = dataclasses.replace(config, weight_average_decay=0.0)
    trained = train_model(synthetic_dataset, StubCandidates(synthetic_dataset), live).model.state_dict()
    assert any(not torch.equal(trained[name], weights) for name, weights in initial.items())
