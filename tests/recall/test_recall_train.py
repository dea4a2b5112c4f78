"""Training data of the two towers: every prefix, right-aligned targets, no validation/test items."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("torch")

from recall_service.train import RecallTrainConfig, build_training_windows
from recsys.data.split import LeaveOneOutSplit
from tests.recall.conftest import six_item_model


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


def test_per_prefix_windows_train_each_target_once_at_the_newest_position(make_dataset) -> None:
    sequence = list(range(10))  # 8 training items, then validation (8) and test (9)
    dataset = make_dataset([sequence, [20, 21, 22]], num_items=23)
    windows = build_training_windows(dataset, LeaveOneOutSplit(dataset), max_length=4, per_prefix=True)
    # user 0: prefixes of 1..7 items predict items 1..7; user 1 (train 20): no prefix with history
    assert (windows.targets[:, :-1] == 0).all()  # only the newest position has a target
    assert sorted((windows.targets[:, -1] - 1).tolist()) == list(range(1, 8))
    row = int(np.flatnonzero(windows.targets[:, -1] == 7 + 1)[0])  # predicts 7 from the newest 4
    np.testing.assert_array_equal(windows.items[row], [4, 5, 6, 7])
    assert windows.lengths[row] == 4
    row = int(np.flatnonzero(windows.targets[:, -1] == 1 + 1)[0])  # predicts 1 from item 0 alone
    np.testing.assert_array_equal(windows.items[row], [0, 0, 0, 1])
    assert windows.lengths[row] == 1
    assert windows.per_prefix and not build_training_windows(dataset, LeaveOneOutSplit(dataset), 4).per_prefix


def test_newest_only_objective_gives_the_full_encoders_loss_on_per_prefix_windows(make_dataset) -> None:
    import torch

    from recall_service.model import TwoTowerModel, TwoTowerShape
    from recall_service.train import RecallObjective, SampledSoftmaxLoss

    dataset = make_dataset([list(range(9)), [10, 11, 12, 13, 14, 15]], num_items=16)
    windows = build_training_windows(dataset, LeaveOneOutSplit(dataset), max_length=4, per_prefix=True)
    torch.manual_seed(0)
    for post_norm in (False, True):
        shape = TwoTowerShape(
            num_items=16,
            num_attributes=3,
            max_attributes=1,
            num_scenarios=1,
            dim=8,
            layers=2,
            max_length=4,
            relative_positions=True,
            post_norm=post_norm,
        )
        model = TwoTowerModel(shape, np.zeros((17, 1), dtype=np.int64)).eval()  # no dropout

        def loss(newest_only: bool, model: TwoTowerModel = model) -> torch.Tensor:
            loss_fn = SampledSoftmaxLoss(np.ones(16), uniform_negatives=16, rng=np.random.default_rng(0))
            tensors = (torch.as_tensor(a) for a in (windows.items, windows.events, windows.targets))
            items, events, targets = tensors
            scenarios = torch.as_tensor(windows.scenarios)
            return RecallObjective(model, loss_fn, newest_only)(items, events, targets, scenarios, None)

        torch.testing.assert_close(loss(True), loss(False))


def test_refit_windows_add_the_validation_item_but_never_the_test_item(make_dataset) -> None:
    dataset = make_dataset([[0, 1, 2, 3, 4], [5, 6]], num_items=7)
    windows = build_training_windows(
        dataset, LeaveOneOutSplit(dataset), max_length=4, include_validation=True
    )
    targets = set((windows.targets[windows.targets > 0] - 1).tolist())
    assert targets == {0, 1, 2, 3, 5, 6}  # 3 is user 0's validation item; 4 (test) stays out


@pytest.mark.parametrize("decay", [0.0, 0.5])
def test_refit_returns_the_weight_average_when_training_keeps_one(make_dataset, monkeypatch, decay) -> None:
    """The refit model is what early stopping validated: the averaged weights when the config
    keeps an average (the live ones otherwise)."""
    import torch

    from recall_service import train as recall_train
    from recsys.training import DistributedContext

    dataset = make_dataset([[0, 1, 2, 3, 4], [5, 6, 1, 2]], num_items=7)
    config = replace(RecallTrainConfig.tiny(), weight_average_decay=decay, use_attributes=False, text="off")
    attributes = recall_train.model_attributes(dataset, config)
    shape = recall_train.model_shape(dataset, config, attributes.shape[1])

    def one_known_step(objective, optimizer, windows, batch_size, rng, average, *args):
        with torch.no_grad():  # every weight moves by +1: the average moves half as far
            for parameter in objective.model.parameters():
                parameter.add_(1.0)
        if average is not None:
            average.update()
        return 0.0

    monkeypatch.setattr(recall_train, "train_one_epoch", one_known_step)
    torch.manual_seed(config.seed)
    start = recall_train.TwoTowerModel(shape, attributes).state_dict()
    model = recall_train._refit(
        dataset, LeaveOneOutSplit(dataset), config, shape, attributes, None, 1, DistributedContext(), "fp32"
    )
    moved = 1.0 - decay
    weight = "item_embedding.weight"
    torch.testing.assert_close(model.state_dict()[weight], start[weight] + moved)


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

    from recsys.training import WeightAverage, averaged_weights

    model = torch.nn.Linear(2, 2)
    average = WeightAverage(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    average.update()
    torch.testing.assert_close(average.state_dict(model)["weight"], start + 1.0)  # 0.75 old + 0.25 new
    torch.testing.assert_close(model.weight, start + 4.0)  # the live weights are untouched
    # Training validates (and keeps) the averaged weights inside averaged_weights, which puts the
    # live ones back after it, even when the block raises: the average keeps following them.
    with averaged_weights(model, average):
        torch.testing.assert_close(model.weight, start + 1.0)
    torch.testing.assert_close(model.weight, start + 4.0)
    with pytest.raises(RuntimeError), averaged_weights(model, average):
        raise RuntimeError("validation failed")
    torch.testing.assert_close(model.weight, start + 4.0)
    average.update()
    torch.testing.assert_close(average.state_dict(model)["weight"], start + 1.75)
    with averaged_weights(model, None):  # no average: the live weights throughout
        torch.testing.assert_close(model.weight, start + 4.0)


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


def test_item_table_is_every_items_features_with_the_same_gradients() -> None:
    """Training's item table (sparse attribute mean) computes what the serving graph's per-token
    gather computes, values and gradients."""
    import torch

    model = six_item_model()
    items = torch.arange(0, 7)
    weights = torch.randn(7, 8)
    (model.item_table() * weights).sum().backward()
    table_grads = [p.grad.clone() for p in (model.item_embedding.weight, model.attribute_embedding.weight)]
    model.zero_grad()
    (model.item_features(items) * weights).sum().backward()
    torch.testing.assert_close(model.item_table(), model.item_features(items))
    parameters = (model.item_embedding.weight, model.attribute_embedding.weight)
    for table_grad, parameter in zip(table_grads, parameters, strict=True):
        torch.testing.assert_close(table_grad[1:], parameter.grad[1:])  # row 0: padding, never trained


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_candidate_rows_are_the_catalogs_vectors_of_those_items_with_the_same_gradients(similarity) -> None:
    """A sampled softmax reads its candidates' rows straight from the item table: the values and
    gradients of gathering them from the whole catalog's vectors."""
    import torch

    model = six_item_model(similarity)
    candidates = torch.tensor([6, 2, 3, 1, 1])  # +1 ids; a repeat (padding columns repeat an item)
    weights = torch.randn(5, 8)
    rows = model.candidate_rows(model.item_table(), candidates)
    (rows * weights).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    reference = model.candidate_vectors(model.item_table())[candidates - 1]
    (reference * weights).sum().backward()
    torch.testing.assert_close(rows, reference, rtol=0, atol=0)
    reference_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(reference_grads) >= 2
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad)


def test_a_rows_user_vector_and_gradients_do_not_depend_on_the_padding_beside_it() -> None:
    """The relative-position bias is taken from column distances once for the whole batch: a
    history left-padded among longer ones encodes as it does alone, unpadded, and the bias table
    gets the same gradient."""
    import torch

    from recall_service.model import TwoTowerModel, TwoTowerShape

    torch.manual_seed(0)
    shape = TwoTowerShape(
        num_items=9,
        num_attributes=2,
        max_attributes=1,
        num_scenarios=1,
        dim=8,
        layers=2,
        max_length=6,
        relative_positions=True,
    )
    model = TwoTowerModel(shape, np.zeros((10, 1), dtype=np.int64)).eval()
    torch.nn.init.normal_(model.relative_bias.weight)  # zeros at first: make the bias matter
    histories = [[3, 1, 4, 1, 5, 9], [2, 6], [], [5, 3, 5]]
    width = max(len(h) for h in histories)
    items = torch.tensor([[0] * (width - len(h)) + h for h in histories])
    events = (items > 0).long()
    batched = model.encode(items, events, model.item_table())[:, -1]
    batched.square().sum().backward()
    batched_grad = model.relative_bias.weight.grad.clone()
    model.zero_grad()
    alone_grad = torch.zeros_like(batched_grad)
    for row, history in enumerate(histories):
        row_items = torch.tensor([history]) if history else torch.zeros(1, 1, dtype=torch.long)
        alone = model.encode(row_items, (row_items > 0).long(), model.item_table())[:, -1]
        torch.testing.assert_close(alone[0], batched[row], rtol=1e-5, atol=1e-6)
        alone.square().sum().backward()
        alone_grad += model.relative_bias.weight.grad
        model.zero_grad()
    torch.testing.assert_close(batched_grad, alone_grad, rtol=1e-4, atol=1e-6)


def test_validator_computes_the_protocols_metrics(synthetic_dataset) -> None:
    """The early-stopping validator (length-bucketed, masks built once) gives evaluate_scorer's
    numbers for the same model: full ranking, history excluded, pessimistic ties."""
    import torch

    from recall_service.model import TwoTowerModel
    from recall_service.train import (
        RecallTrainConfig,
        RecallValidator,
        model_attributes,
        model_shape,
        padded_history,
    )
    from recsys.evaluation.protocol import evaluate_scorer

    config = RecallTrainConfig.tiny()
    attributes = model_attributes(synthetic_dataset, config)
    torch.manual_seed(0)
    model = TwoTowerModel(model_shape(synthetic_dataset, config, attributes.shape[1]), attributes).eval()
    split = LeaveOneOutSplit(synthetic_dataset)

    @torch.no_grad()
    def full_width_scores(users: np.ndarray, phase: str) -> np.ndarray:
        rows = [
            padded_history(h, synthetic_dataset.events_of(int(u))[: len(h)], config.max_length)
            for u in users
            for h in [split.history(int(u), phase)]
        ]
        scenarios = [
            0
            if synthetic_dataset.scenarios is None
            else synthetic_dataset.scenarios[u][len(split.history(u, phase))]
            for u in users
        ]
        vectors = model(
            torch.as_tensor(np.stack([r[0] for r in rows])),
            torch.as_tensor(np.stack([r[1] for r in rows])),
            torch.as_tensor(np.asarray(scenarios, dtype=np.int64)),
        )
        return model.item_logits(vectors, torch.arange(1, synthetic_dataset.num_items + 1)).numpy()

    for phase in ("valid", "test"):
        expected = evaluate_scorer(full_width_scores, split, phase, ks=(10, 50))
        actual = RecallValidator(synthetic_dataset, split, split.eval_users, config.max_length, phase, 64)(
            model, (10, 50)
        )
        assert actual == pytest.approx(expected, abs=1e-9)


def test_fast_dropout_keeps_the_law_and_is_the_identity_in_eval() -> None:
    import torch

    from recsys.torch_layers import Dropout

    torch.manual_seed(0)
    dropout = Dropout(0.3)
    hidden = torch.ones(200_000)
    dropped = dropout(hidden)
    kept = dropped > 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005
    torch.testing.assert_close(dropped[kept], torch.full_like(dropped[kept], 1 / 0.7))
    assert torch.equal(dropout.eval()(hidden), hidden)


def test_training_run_records_what_stopped_it(caplog: pytest.LogCaptureFixture) -> None:
    from recsys.training import STOP_REASONS, TrainingRun

    run = TrainingRun(max_epochs=10, patience=2, seed=3, threads=2)
    stops = [
        (run.update(epoch, metric), run.should_stop(epoch))
        for epoch, metric in enumerate([0.1, 0.3, 0.2, 0.25], 1)
    ]
    assert stops == [(True, False), (True, False), (False, False), (False, True)]
    record = run.record()
    assert (record["stop_reason"], record["epochs_run"], record["best_epoch"]) == ("early_stop", 4, 2)
    assert (record["seed"], record["threads"], record["processes"]) == (3, 2, 1)
    assert set(STOP_REASONS) == {"early_stop", "max_epochs", "time_guard"}

    budget = TrainingRun(max_epochs=2, patience=5)
    assert not (budget.update(1, 0.1) and budget.should_stop(1))
    budget.update(2, 0.2)
    assert budget.should_stop(2) and budget.stop_reason == "max_epochs"

    guarded = TrainingRun(max_epochs=100, patience=5, time_guard_s=0.0)
    guarded.update(1, 0.1)
    with caplog.at_level("WARNING", logger="recsys.training"):
        assert guarded.should_stop(1) and guarded.stop_reason == "time_guard"
    assert "TIME GUARD" in caplog.text  # logged when it fires


def test_training_steps_drop_to_the_cores_the_host_gives_and_probe_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While the threads wait on the run queue for a CPU (a busy host), the steps up to the next
    probe run on fewer threads; each probe runs on all of them again; an idle host keeps them."""
    import torch

    from recsys import training

    monkeypatch.setattr(training, "openmp_threads_spin", lambda: True)
    clock = {"wall": 0.0, "wait": 0.0}
    monkeypatch.setattr(training.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(training, "run_queue_wait_seconds", lambda: clock["wait"])
    threads_before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # whatever the count before, the first probe runs on all threads
        governor = training.ThreadGovernor(2, probe_steps=2, every=5)
        assert governor.enabled
        seen = []
        for step in governor.run(range(12)):
            seen.append(torch.get_num_threads())
            clock["wall"] += 0.1
            # Busy host during the first probe (2 threads x 0.1 s, 0.08 s of it waiting), idle after.
            clock["wait"] += 0.08 if step < 2 else 0.0
        assert seen == [2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
        assert governor.record() == {"steps": 12, "reduced_thread_steps": 3}

        one = training.ThreadGovernor(1)  # nothing to take away from one thread
        assert not one.enabled and list(one.run(range(3))) == [0, 1, 2]
    finally:
        torch.set_num_threads(threads_before)


def test_trainers_spin_briefly_unless_the_environment_says_and_govern_only_spinning_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Importing a trainer sets recsys.training.TRAINING_OPENMP_ENV before torch loads, unless
    OMP_WAIT_POLICY is already set; the governor acts only where threads spin."""
    import os
    import subprocess
    import sys

    from recsys import training

    probe = (
        "import os, recall_service.train, rank_service.train; "
        "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for extra, expected in (
        ({}, " ".join(training.TRAINING_OPENMP_ENV.values())),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE None"),
    ):
        out = subprocess.run(
            [sys.executable, "-c", probe], env={**clean, **extra}, capture_output=True, text=True, check=True
        )
        assert out.stdout.split("\n")[-2] == expected

    for policy, spin, spins in (("PASSIVE", None, False), ("PASSIVE", "10000", True), ("ACTIVE", None, True)):
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        if spin is None:
            monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
        else:
            monkeypatch.setenv("GOMP_SPINCOUNT", spin)
        assert training.openmp_threads_spin() is spins
        assert training.ThreadGovernor(2).enabled is (spins and training.run_queue_wait_seconds() is not None)


def test_run_queue_wait_is_read_from_the_kernel_where_it_reports_it() -> None:
    import os

    from recsys.training import run_queue_wait_seconds

    wait = run_queue_wait_seconds()
    if not os.path.exists("/proc/self/task"):
        assert wait is None
    else:
        assert wait is not None and wait >= 0.0


def test_training_uses_every_core_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from recall_service.train import RecallTrainConfig
    from recsys.training import available_cores, resolve_threads

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert RecallTrainConfig.default().threads == 0
    assert resolve_threads(0) == available_cores()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: this host's processes share the cores
    assert resolve_threads(0) == max(1, available_cores() // 2)
    assert resolve_threads(3) == 3


def test_recall_bundle_manifest_records_the_training_run(recall_bundle) -> None:
    import json

    from recsys.training import STOP_REASONS

    train = json.loads((recall_bundle / "manifest.json").read_text())["train"]
    assert train["stop_reason"] in STOP_REASONS
    assert 1 <= train["best_epoch"] <= train["epochs_run"] <= train["max_epochs"]
    assert train["threads"] >= 1 and train["processes"] == 1 and train["seed"] == 7
    assert train["per_prefix_targets"] is False
    assert train["train_seconds"] > 0 and train["device"] == "cpu"
    assert 0 <= train["reduced_thread_steps"] <= train["steps"] and train["steps"] > 0


@pytest.mark.gpu
def test_training_finds_the_gpu_and_trains_in_mixed_precision(synthetic_dataset) -> None:
    """On a CUDA host the default device is the GPU with bf16 autocast; the result comes back to
    the CPU (export) and validates like a CPU model of the same weights."""
    import dataclasses

    import torch

    from recall_service.train import RecallTrainConfig, RecallValidator, train_model

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    config = dataclasses.replace(RecallTrainConfig.tiny(), epochs=2)
    result = train_model(synthetic_dataset, config)
    assert result.run["device"] == "cuda" and result.run["precision"] == "bf16"
    assert next(result.model.parameters()).device.type == "cpu"
    split = LeaveOneOutSplit(synthetic_dataset)
    valid = RecallValidator(synthetic_dataset, split, split.eval_users, config.max_length)(result.model)
    assert valid["HR@10"] == pytest.approx(result.best_valid["HR@10"], abs=0.02)


def test_per_prefix_training_learns_more_than_popularity(synthetic_dataset) -> None:
    """The per-prefix recipe end to end on the tiny data: it trains, validates what it keeps, and
    ranks validation targets better than popularity counted over the training items."""
    import dataclasses

    from recall_service.train import RecallTrainConfig, RecallValidator, train_model

    split = LeaveOneOutSplit(synthetic_dataset)
    config = dataclasses.replace(RecallTrainConfig.tiny(), per_prefix_targets=True, epochs=3, threads=1)
    result = train_model(synthetic_dataset, config)
    validator = RecallValidator(synthetic_dataset, split, split.eval_users, config.max_length)
    assert validator(result.model)["HR@10"] == pytest.approx(result.best_valid["HR@10"], abs=1e-6)
    counts = np.bincount(
        np.concatenate([split.train_sequence(u) for u in range(synthetic_dataset.num_users)]),
        minlength=synthetic_dataset.num_items,
    )
    popular_top10 = set(np.argsort(-counts, kind="stable")[:10].tolist())
    popularity_hr = np.mean([int(t) in popular_top10 for t in split.targets(split.eval_users, "valid")])
    assert result.best_valid["HR@10"] > 1.3 * popularity_hr  # 0.39 vs 0.25 when written


def test_recipe_flags_of_the_train_command_reach_the_config(synthetic_dir, tmp_path, monkeypatch) -> None:
    """`recsys train recall` defaults to the per-prefix recipe; its flags give the former one."""
    import recall_service.train as recall_train

    seen: list[recall_train.RecallTrainConfig] = []

    def capture(dataset, config, context=None, text_encoder=None):
        seen.append(config)
        raise RuntimeError("stop after the config")

    monkeypatch.setattr(recall_train, "train_model", capture)
    base = ["--data", str(synthetic_dir), "--artifacts", str(tmp_path)]
    former = ["--no-per-prefix-targets", "--batch-size", "64", "--learning-rate", "0.001"]
    for argv in (base, [*base, *former]):
        with pytest.raises(RuntimeError, match="stop after the config"):
            recall_train.main(argv)
    default, chosen = seen
    assert default == recall_train.RecallTrainConfig.default()
    assert default.per_prefix_targets and default.batch_size == 256
    assert not chosen.per_prefix_targets and (chosen.batch_size, chosen.learning_rate) == (64, 0.001)
