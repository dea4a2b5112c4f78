"""Offline evaluation of the validation phase never counts the validation targets.

A recall bundle's co-visitation and popularity tables are counted over everything but each
user's test item: right for the test phase, a leak for the validation phase (each validation
target's own transition from the item before it is in the table). The evaluators rebuild them
from the training items alone for that phase.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from recall_service.engine import RecallEngine
from recall_service.evaluate import tables_for_phase
from recall_service.sources import build_covisit_table
from recsys.data.split import LeaveOneOutSplit
from recsys.evaluation.popularity import popularity_table


def own_transitions(dataset, split: LeaveOneOutSplit, window: int) -> list[tuple[int, int]]:
    """(item before, validation target) of the evaluated users whose pair no training sequence
    holds within the co-visitation window: only their own validation item can put it in a table."""
    training_pairs: set[tuple[int, int]] = set()
    for user in range(dataset.num_users):
        sequence = split.train_sequence(user).tolist()
        for distance in range(1, window + 1):
            training_pairs.update(zip(sequence[:-distance], sequence[distance:], strict=True))
    pairs = []
    for user in split.eval_users:
        before, target = int(split.history(int(user), "valid")[-1]), split.target(int(user), "valid")
        unseen = (before, target) not in training_pairs and (target, before) not in training_pairs
        if before != target and unseen:
            pairs.append((before, target))
    return pairs


def row_items(engine: RecallEngine, item: int) -> set[int]:
    return set(engine.covisit.row(item)[0].tolist())


def test_validation_phase_tables_never_hold_a_validation_targets_own_transition(
    synthetic_dataset, recall_bundle: Path
):
    dataset, split = synthetic_dataset, LeaveOneOutSplit(synthetic_dataset)
    engine = RecallEngine.load(recall_bundle, "cpu", 1)
    pairs = own_transitions(dataset, split, int(engine.manifest["covisit"]["window"]))
    assert pairs, "the tiny data must hold validation transitions seen nowhere in training"
    leaked = [(before, target) for before, target in pairs if target in row_items(engine, before)]
    assert leaked, "the bundle's own tables count validation items (the test phase's convention)"

    tables_for_phase(engine, dataset, split, "test")  # the test phase keeps the bundle's tables
    assert [(b, t) for b, t in pairs if t in row_items(engine, b)] == leaked

    tables_for_phase(engine, dataset, split, "valid")
    assert not [(b, t) for b, t in pairs if t in row_items(engine, b)]
    # exactly the training-only tables, with the bundle's settings
    settings = engine.manifest["covisit"]
    expected = build_covisit_table(
        [split.train_sequence(u) for u in range(dataset.num_users)],
        dataset.num_items,
        window=settings["window"],
        backward_weight=settings["backward_weight"],
        popularity_exponent=settings["popularity_exponent"],
        top_m=settings["neighbours"],
    )
    np.testing.assert_array_equal(engine.covisit.indptr, expected.indptr)
    np.testing.assert_array_equal(engine.covisit.neighbours, expected.neighbours)
    np.testing.assert_array_equal(engine.popularity.counts, popularity_table(dataset, split, "valid"))
    # the popular source (and the merge's top-up) follow the new table
    assert engine._filter(-1, False)[2].tolist() == engine.popularity.global_order.tolist()


async def test_the_scenario_evaluator_serves_the_validation_phase_from_training_only_tables(
    synthetic_dataset, recall_bundle: Path, rank_bundle: Path
):
    from recsys.app.scenario_eval import OfflinePipeline
    from recsys.scenario.config import DEFAULT_SCENARIOS_FILE

    split = LeaveOneOutSplit(synthetic_dataset)
    offline = await OfflinePipeline.load(
        recall_bundle,
        rank_bundle,
        DEFAULT_SCENARIOS_FILE,
        prepare_recall=lambda engine: tables_for_phase(engine, synthetic_dataset, split, "valid"),
    )
    try:
        catalog = offline.pipeline.catalog
        counts = popularity_table(synthetic_dataset, split, "valid")
        assert catalog is not None
        np.testing.assert_array_equal(catalog.item_interactions, counts)  # coverage / cold share
        assert catalog.popular[:20].tolist() == np.lexsort((np.arange(len(counts)), -counts))[:20].tolist()
    finally:
        await offline.close()
