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


@pytest.mark.parametrize("held_out", [1, 2, 3])
def test_holdout_bundle_never_sees_a_target_even_of_short_sequences(synthetic_dataset, held_out):
    import dataclasses

    from rank_service.train import holdout_dataset
    from recall_service.export import holdout_sequences

    # every fourth user cut to 4 or 5 items: training sequences of 2-3, held-out sequences of 1-3
    def shorten(arrays):
        if arrays is None:
            return None
        return [values[: 4 + user % 2] if user % 4 == 0 else values for user, values in enumerate(arrays)]

    names = ("sequences", "event_types", "scenarios", "timestamps")
    dataset = dataclasses.replace(
        synthetic_dataset, **{name: shorten(getattr(synthetic_dataset, name)) for name in names}
    )
    split = LeaveOneOutSplit(dataset)
    holdout = holdout_dataset(dataset, split, held_out=held_out)
    tables = holdout_sequences(holdout)  # what the bundle's co-visitation and popularity count
    trained = LeaveOneOutSplit(holdout)  # what its two-tower model trains on
    short = 0
    for user in range(dataset.num_users):
        train = split.train_sequence(user)
        cut = len(train) - held_out  # the ranker's prefix whose target the bundle must not see
        if cut < 1:
            continue
        short += len(holdout.sequences[user]) < 3
        for seen in (tables[user], trained.train_sequence(user)):
            assert len(seen) <= cut and np.array_equal(seen, train[: len(seen)]), user
    assert short > 0  # the short-sequence path was exercised


class RecordingCandidates(StubCandidates):
    """A stub source that records the history lengths it was asked for."""

    def __init__(self, dataset):
        super().__init__(dataset)
        self.asked: list[int] = []

    def generate(self, histories, events, scenarios, k):
        self.asked.extend(len(history) for history in histories)
        return super().generate(histories, events, scenarios, k)


def test_each_prefix_takes_its_lists_from_its_own_held_out_source(synthetic_dataset):
    from rank_service.train import concatenate_lists

    split = LeaveOneOutSplit(synthetic_dataset)
    config = RankTrainConfig.tiny()
    sources = [RecordingCandidates(synthetic_dataset) for _ in range(2)]
    parts = [
        training_lists(synthetic_dataset, split, source, config, from_end=j + 1)
        for j, source in enumerate(sources)
    ]
    for j, (part, source) in enumerate(zip(parts, sources, strict=True)):
        assert len(part.users) > 0
        for user, cut in zip(part.users, part.cuts, strict=True):
            assert cut == split.train_length(int(user)) - (j + 1)
        # every history this source was asked for is one of its own prefixes
        expected = {split.train_length(u) - (j + 1) for u in range(synthetic_dataset.num_users)}
        assert set(source.asked) <= expected
    merged = concatenate_lists(parts)
    assert len(merged.users) == sum(len(part.users) for part in parts) == len(merged.lists)
    assert np.array_equal(merged.cuts, np.concatenate([part.cuts for part in parts]))


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
    assert train["refit"] == {}  # no refit with validation items by default (the protocol)
    (tmp_path / "recall").symlink_to(recall_bundle)
    (tmp_path / "rank").symlink_to(rank_bundle)
    records = training_records(tmp_path)
    assert records["rank"]["stop_reason"] == train["stop_reason"]
    assert records["rank"]["seed"] == 7 and records["recall"]["seed"] == 7
    assert "refit_epochs" not in records["rank"]
    assert set(records["recall"]) >= {"stop_reason", "epochs_run", "best_epoch", "train_seconds", "threads"}


def test_eval_training_records_say_when_the_ranker_was_refit(tmp_path):
    import json

    from recsys.app.eval import training_records

    (tmp_path / "rank").mkdir()
    train = {"stop_reason": "early_stop", "best_epoch": 2, "refit": {"epochs": 2, "lists": 9, "seconds": 1.5}}
    (tmp_path / "rank" / "manifest.json").write_text(json.dumps({"train": train}))
    records = training_records(tmp_path)
    assert records["rank"] == {
        "stop_reason": "early_stop",
        "best_epoch": 2,
        "refit_epochs": 2,
        "refit_seconds": 1.5,
    }


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


def test_validation_target_lists_end_at_each_users_validation_item(synthetic_dataset):
    split = LeaveOneOutSplit(synthetic_dataset)
    lists = training_lists(
        synthetic_dataset, split, StubCandidates(synthetic_dataset), RankTrainConfig.tiny(), from_end=0
    )
    assert len(lists.users) > 0
    for user, cut, candidates, position in zip(
        lists.users, lists.cuts, lists.lists, lists.target_positions, strict=True
    ):
        assert cut == split.train_length(int(user))  # the validation history: no test item
        assert candidates.items[position] == split.target(int(user), "valid")


def test_refit_is_a_fresh_model_trained_for_the_selected_epochs_with_validation_lists(synthetic_dataset):
    import dataclasses

    import torch

    from rank_service.train import build_model, train_model

    config = dataclasses.replace(RankTrainConfig.tiny(), epochs=2, patience=2, refit_with_validation=True)
    source = RecordingCandidates(synthetic_dataset)
    result = train_model(synthetic_dataset, source, config)
    assert result.refit["epochs"] == result.best_epoch
    assert result.refit["validation_lists"] > 0
    assert result.refit["lists"] == result.examples + result.refit["validation_lists"]
    split = LeaveOneOutSplit(synthetic_dataset)
    # the refit asked the same held-out source for each validation history
    assert {split.train_length(int(u)) for u in split.eval_users} <= set(source.asked)
    selected = train_model(
        synthetic_dataset,
        StubCandidates(synthetic_dataset),
        dataclasses.replace(config, refit_with_validation=False),
    )
    assert selected.refit == {}
    refit_weights, selected_weights = result.model.state_dict(), selected.model.state_dict()
    assert any(not torch.equal(refit_weights[name], selected_weights[name]) for name in refit_weights)
    # a weight average that never moves keeps the refit at its fresh initial weights
    frozen = train_model(
        synthetic_dataset,
        StubCandidates(synthetic_dataset),
        dataclasses.replace(config, weight_average_decay=1.0),
    )
    torch.manual_seed(config.seed)
    initial = build_model(synthetic_dataset, split, config).state_dict()
    for name, weights in initial.items():
        torch.testing.assert_close(frozen.model.state_dict()[name], weights, msg=name)


def test_every_training_flag_reaches_the_config():
    from rank_service.train import parse_arguments

    _, config = parse_arguments(
        ["--refit-with-validation", "--prefixes-per-user", "2", "--eval-users", "5", "--candidates", "40",
         "--pretrained-item-ids", "--weight-average-decay", "0.5", "--time-guard-hours", "2", "--seed", "3",
         "--no-served-validation", "--recall-per-prefix-targets"]
    )  # fmt: skip
    assert config.refit_with_validation and config.pretrained_item_ids and config.recall_per_prefix_targets
    assert not config.served_validation and RankTrainConfig.default().served_validation
    assert (config.prefixes_per_user, config.eval_users, config.seed) == (2, 5, 3)
    assert config.train_candidates == config.pipeline_candidates == 40
    assert config.weight_average_decay == 0.5 and config.time_guard_s == 7200.0
    _, default = parse_arguments([])
    assert not default.refit_with_validation and default == RankTrainConfig.default()
    assert default.recall_per_prefix_targets is None  # as the served recall bundle was trained


def test_held_out_recall_bundle_is_trained_with_the_recall_recipe_the_ranker_names(
    synthetic_dataset, tmp_path, monkeypatch
):
    import dataclasses

    import rank_service.train as rank_train
    import recall_service.train as recall_train

    built = []

    def record_config(dataset, bundle_dir, config, context=None):
        built.append(config)
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(recall_train, "build_bundle", record_config)
    for per_prefix in (False, True, None):
        config = dataclasses.replace(RankTrainConfig.quick(), recall_per_prefix_targets=per_prefix, seed=5)
        with pytest.raises(RuntimeError, match="stop after the config"):
            rank_train.holdout_candidates(synthetic_dataset, tmp_path / f"rank{per_prefix}", config)
        expected = (
            recall_train.RecallTrainConfig.default().per_prefix_targets if per_prefix is None else per_prefix
        )
        assert built[-1].per_prefix_targets is expected and built[-1].seed == 5


def test_held_out_recall_bundle_follows_the_served_bundles_recipe_and_is_rebuilt_when_it_differs(
    synthetic_dataset, tmp_path, monkeypatch
):
    """Unless the ranker names a recipe, the held-out bundle is trained as the served bundle's
    manifest says it was; a held-out bundle of the other recipe is stale even on the same data."""
    import dataclasses
    import json

    import rank_service.train as rank_train
    import recall_service.train as recall_train

    served = tmp_path / "recall"
    served.mkdir()
    for served_per_prefix in (False, True):
        (served / "manifest.json").write_text(
            json.dumps({"train": {"per_prefix_targets": served_per_prefix}})
        )
        assert rank_train.trained_per_prefix(served) is served_per_prefix
    (served / "manifest.json").write_text(json.dumps({"train": {}}))  # from before the record
    assert rank_train.trained_per_prefix(served) is False

    held_out_dir = rank_train.holdout_recall_dir(tmp_path / "rank")
    held_out_dir.mkdir(parents=True)
    holdout = rank_train.holdout_dataset(synthetic_dataset, rank_train.LeaveOneOutSplit(synthetic_dataset), 1)
    (held_out_dir / "manifest.json").write_text(
        json.dumps({"data_fingerprint": holdout.fingerprint(), "train": {"per_prefix_targets": False}})
    )
    built, loaded = [], []
    monkeypatch.setattr(
        recall_train, "build_bundle", lambda dataset, bundle_dir, config, context=None: built.append(config)
    )
    monkeypatch.setattr(rank_train, "load_candidates", lambda bundle_dir, config: loaded.append(bundle_dir))
    for per_prefix in (False, True):
        config = dataclasses.replace(RankTrainConfig.quick(), recall_per_prefix_targets=per_prefix)
        rank_train.holdout_candidates(synthetic_dataset, tmp_path / "rank", config)
    assert [config.per_prefix_targets for config in built] == [True]  # the recorded recipe is reused
    assert loaded == [held_out_dir, held_out_dir]


def test_manifest_and_eval_record_every_held_out_bundles_training(synthetic_dataset, recall_bundle, tmp_path):
    """With two training prefixes the ranker learns from two held-out recall bundles: the rank
    manifest records both trainings, and the eval JSON's ``training`` block names each."""
    import dataclasses
    import json
    import shutil

    from rank_service.train import build_bundle, holdout_dataset, holdout_recall_dir
    from recsys.app.eval import training_records

    rank_dir = tmp_path / "rank"
    split = LeaveOneOutSplit(synthetic_dataset)
    for held_out, seconds in ((1, 11.0), (2, 22.0)):  # stand-ins, already built on the right data
        folder = holdout_recall_dir(rank_dir, held_out)
        shutil.copytree(recall_bundle, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["data_fingerprint"] = holdout_dataset(synthetic_dataset, split, held_out).fingerprint()
        manifest["train"] = {**manifest["train"], "train_seconds": seconds, "best_valid": {"HR@10": 0.1}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    config = dataclasses.replace(RankTrainConfig.tiny(), holdout_recall=True, prefixes_per_user=2, epochs=1)
    build_bundle(synthetic_dataset, recall_bundle, rank_dir, config)

    train = json.loads((rank_dir / "manifest.json").read_text())["train"]
    assert train["holdout_recall"]["held_out"] == 1 and train["holdout_recall"]["train_seconds"] == 11.0
    assert [b["held_out"] for b in train["holdout_recall_earlier"]] == [2]
    assert train["holdout_recall_earlier"][0]["train_seconds"] == 22.0
    assert "best_valid" not in train["holdout_recall"]
    records = training_records(tmp_path)
    assert records["rank_holdout_recall"]["train_seconds"] == 11.0
    assert records["rank_holdout_recall_2"]["train_seconds"] == 22.0


@pytest.mark.parametrize("served_validation", [True, False])
def test_early_stopping_lists_come_from_the_served_bundle_with_training_only_tables(
    synthetic_dataset, recall_bundle, tmp_path, served_validation
):
    """The ranker early-stops on what the served recall bundle gives each validation history, its
    co-visitation and popularity counted over training items (as `recsys eval --phase valid`
    serves), or with ``served_validation`` off on the held-out bundle's lists."""
    import dataclasses
    import json
    import shutil

    from rank_service.train import (
        answer_validation_phase,
        build_bundle,
        eval_lists,
        holdout_dataset,
        holdout_recall_dir,
        load_candidates,
    )

    rank_dir = tmp_path / "rank"
    split = LeaveOneOutSplit(synthetic_dataset)
    holdout_dir = holdout_recall_dir(rank_dir)  # a stand-in: the served bundle, its own tables
    shutil.copytree(recall_bundle, holdout_dir)
    manifest = json.loads((holdout_dir / "manifest.json").read_text())
    manifest["data_fingerprint"] = holdout_dataset(synthetic_dataset, split).fingerprint()
    (holdout_dir / "manifest.json").write_text(json.dumps(manifest))
    config = dataclasses.replace(
        RankTrainConfig.tiny(),
        holdout_recall=True,
        prefixes_per_user=1,
        epochs=1,
        eval_users=0,
        served_validation=served_validation,
    )
    build_bundle(synthetic_dataset, recall_bundle, rank_dir, config)
    recorded = json.loads((rank_dir / "manifest.json").read_text())["train"]["valid_recall_only"]

    def recall_order(source):
        lists = eval_lists(
            synthetic_dataset, split, source, "valid", split.eval_users, config.pipeline_candidates
        )
        return pipeline_metrics(
            synthetic_dataset,
            split,
            "valid",
            split.eval_users,
            lists,
            lambda h, e, s, lists: [-np.arange(len(c.items), dtype=np.float32) for c in lists],
        )

    served = recall_order(answer_validation_phase(synthetic_dataset, load_candidates(recall_bundle, config)))
    held_out = recall_order(load_candidates(holdout_dir, config))
    # the stand-in's tables count each validation item's transition: it scores higher
    assert held_out["NDCG@10"] > served["NDCG@10"]
    expected = served if served_validation else held_out
    assert recorded["NDCG@10"] == pytest.approx(expected["NDCG@10"])
    assert recorded["HR@10"] == pytest.approx(expected["HR@10"])
