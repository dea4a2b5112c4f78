"""`recsys eval --scenario`: what a scenario serves, scored under the protocol, through the
gateway's pipeline in process (the parity with the real gateway is in tests/gateway/test_gateway_e2e.py)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from rank_service.candidates import RecallCandidates
from recsys.app.scenario_eval import (
    NUM_ITEMS,
    OfflinePipeline,
    evaluate_scenarios,
    scenario_request,
    without_budgets,
)
from recsys.data.split import LeaveOneOutSplit
from recsys.scenario.config import DEFAULT_SCENARIOS_FILE, load_scenarios

pytestmark = pytest.mark.integration
EXPLORATION_EXAMPLE = DEFAULT_SCENARIOS_FILE.parent / "examples" / "exploration.yaml"


async def test_each_scenario_is_scored_with_its_context_and_no_fallbacks(
    synthetic_dataset, recall_bundle, rank_bundle, tmp_path
):
    document = yaml.safe_load(DEFAULT_SCENARIOS_FILE.read_text())
    document["scenarios"]["home_recall_only"] = {
        "model_scenario": "home",
        "stages": [{"recall": {"k": 60, "filters": {"exclude_history": True}}}],
    }
    scenarios = tmp_path / "scenarios.yaml"
    scenarios.write_text(yaml.safe_dump(document))
    split = LeaveOneOutSplit(synthetic_dataset)
    users = split.eval_users[:40]
    results = await evaluate_scenarios(
        synthetic_dataset,
        split,
        recall_bundle,
        rank_bundle,
        ["home", "item_detail", "category", "home_recall_only"],
        scenarios,
        "test",
        users=users,
    )
    for name, metrics in results.items():
        assert metrics["users"] + metrics["skipped_users"] == len(users), name
        assert metrics["degraded_answers"] == 0, name
        assert 0.0 <= metrics["HR@10"] <= metrics["HR@20"] <= metrics["HR@50"] <= 1.0, name
        assert metrics["num_items"] == NUM_ITEMS and metrics["recall_version"] and metrics["rank_version"]


def test_scenario_requests_carry_the_context_each_scenario_needs(synthetic_dataset):
    dataset = synthetic_dataset
    split = LeaveOneOutSplit(dataset)
    scenarios = load_scenarios(DEFAULT_SCENARIOS_FILE)
    user = int(split.eval_users[0])
    history, target = split.history(user, "test"), split.target(user, "test")
    home = scenario_request(dataset, scenarios.get("home"), user, history, target, 50)
    assert home is not None and not home.context_item_ids and not home.context_category
    assert [h.item_id for h in home.history] == dataset.items.external_many(history)
    detail = scenario_request(dataset, scenarios.get("item_detail"), user, history, target, 50)
    assert detail.context_item_ids == (dataset.items.external(int(history[-1])),)
    category = scenario_request(dataset, scenarios.get("category"), user, history, target, 50)
    category_id = int(dataset.catalog.category[target])
    assert category.context_category == dataset.catalog.category_names[category_id]
    lifted = without_budgets(scenarios.get("home"))
    assert lifted.timeout_ms >= 60_000 and all(getattr(s, "timeout_ms", 1e9) >= 60_000 for s in lifted.stages)
    assert np.isfinite(lifted.recall.k)


async def test_training_lists_are_what_the_served_recall_stage_sends_to_rank(
    synthetic_dataset, recall_bundle, rank_bundle
):
    """The ranker trains on the lists the compiled scenario's recall stage produces when it serves
    (same sources, quotas, seeds, exclusions, cut to the rank stage's max_candidates)."""
    dataset = synthetic_dataset
    split = LeaveOneOutSplit(dataset)
    scenarios = load_scenarios(DEFAULT_SCENARIOS_FILE)
    source = RecallCandidates.load(recall_bundle, threads=1, scenarios=scenarios)
    offline = await OfflinePipeline.load(recall_bundle, rank_bundle, DEFAULT_SCENARIOS_FILE)
    users = [int(u) for u in split.eval_users[:8]]
    compared = 0
    for name in ("home", "item_detail", "cart"):
        served = offline.scenario(name)
        recall_only = served.replace_stage("rerank", None).replace_stage("rank", None)
        histories = [split.history(user, "test") for user in users]
        events = [dataset.events_of(user)[: len(h)] for user, h in zip(users, histories, strict=True)]
        lists = source.generate(histories, events, [name] * len(users), None)
        for user, history, candidates in zip(users, histories, lists, strict=True):
            inputs = scenario_request(
                dataset, recall_only, user, history, split.target(user, "test"), served.rank.max_candidates
            )
            result = await offline.serve(inputs)
            assert not result.degraded
            assert candidates.items.tolist() == result.candidates.items.tolist(), (name, user)
            assert len(candidates.items) <= served.rank.max_candidates
            compared += 1
    await offline.close()
    assert compared == 3 * len(users)


async def test_each_arm_of_an_experiment_is_evaluated_with_coverage(
    synthetic_dataset, recall_bundle, rank_bundle
):
    """The shipped exploration example: both arms scored; the explore arm fills more of its top
    10 with cold items than control, and coverage is reported for each."""
    split = LeaveOneOutSplit(synthetic_dataset)
    results = await evaluate_scenarios(
        synthetic_dataset,
        split,
        recall_bundle,
        rank_bundle,
        ["home"],
        EXPLORATION_EXAMPLE,
        "test",
        users=split.eval_users[:60],
    )
    assert set(results) == {"home/control", "home/explore"}
    control, explored = results["home/control"], results["home/explore"]
    for metrics in (control, explored):
        assert 0 < metrics["coverage@10"] <= 1 and 0 <= metrics["cold_share@10"] <= 1
    assert explored["cold_share@10"] >= control["cold_share@10"]
