"""Experiments: users bucketed into arms deterministically, every answer naming its experiment and
arm, impressions and the clicks/conversions attributed to them counted per arm — so simulated
users who prefer what the better arm shows give it a measurably higher CTR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from recsys.scenario.config import DEFAULT_SCENARIOS_FILE, load_scenarios, parse_scenarios
from recsys.scenario.spec import ScenarioConfigError
from recsys.v1 import common_pb2, gateway_pb2
from tests.gateway.conftest import FakeStack
from tests.gateway.fakes import item_index

RECALL = {"recall": {"sources": {"popular": 50}, "k": 50}}
EXPERIMENT_SCENARIO = {
    "model_scenario": "home",
    "stages": [RECALL, {"rank": {"max_candidates": 50}}],
    "experiment": {
        "name": "rank_vs_recall",
        "salt": "s1",
        "arms": {"ranked": {"share": 50}, "recall_only": {"share": 50, "stages": [RECALL]}},
    },
}


def with_experiment(tmp_path: Path, scenario: dict) -> Path:
    document = yaml.safe_load(DEFAULT_SCENARIOS_FILE.read_text())
    document["scenarios"]["exp_home"] = scenario
    path = tmp_path / "experiments.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_users_are_bucketed_by_a_hash_stable_across_loads_and_shares_are_respected(tmp_path: Path):
    path = with_experiment(tmp_path, EXPERIMENT_SCENARIO)
    first, second = load_scenarios(path).get("exp_home"), load_scenarios(path).get("exp_home")
    users = [f"user-{n}" for n in range(4000)]
    arms = [first.variant_for(user).arm for user in users]
    assert arms == [second.variant_for(user).arm for user in users]  # a restart, another replica
    assert abs(arms.count("ranked") / len(users) - 0.5) < 0.03
    variant = first.variant_for("user-1")
    assert variant.experiment_name == "rank_vs_recall" and variant.name == "exp_home"
    assert (variant.rank is None) == (variant.arm == "recall_only")
    resalted = dict(EXPERIMENT_SCENARIO, experiment=dict(EXPERIMENT_SCENARIO["experiment"], salt="s2"))
    other = load_scenarios(with_experiment(tmp_path, resalted)).get("exp_home")
    moved = sum(other.variant_for(user).arm != arm for user, arm in zip(users, arms, strict=True))
    assert 0.4 < moved / len(users) < 0.6  # a new salt reshuffles users independently


@pytest.mark.parametrize(
    ("experiment", "message"),
    [
        ({"arms": {"a": {"share": 50}, "b": {"share": 50}}}, "name is required"),
        ({"name": "x", "arms": {"a": {"share": 100}}}, "at least two arm"),
        ({"name": "x", "arms": {"a": {"share": 0}, "b": {"share": 50}}}, "arm 'a': share must be > 0"),
        (
            {"name": "x", "arms": {"a": {"share": 50}, "b": {"share": 50, "stages": [{"rank": {}}]}}},
            "arm 'b'",
        ),
        ({"name": "x", "arms": {"a": {"share": 50}, "b": {"share": 50, "color": 1}}}, "unknown field"),
    ],
)
def test_a_bad_experiment_is_rejected_naming_the_scenario_and_arm(experiment: dict, message: str):
    document = yaml.safe_load(DEFAULT_SCENARIOS_FILE.read_text())
    document["scenarios"]["exp_home"] = dict(EXPERIMENT_SCENARIO, experiment=experiment)
    with pytest.raises(ScenarioConfigError, match="scenario 'exp_home'") as raised:
        parse_scenarios(document)
    assert message in str(raised.value)


async def test_the_better_arm_gets_a_measurably_higher_ctr(tmp_path: Path, fake_stack: FakeStack):
    """Simulated users click each shown item with probability index/100; the fake ranker puts the
    highest indices first, so the ranked arm must show a higher CTR than the recall order."""
    registry = fake_stack.gateway.scenarios
    registry.path = with_experiment(tmp_path, EXPERIMENT_SCENARIO)
    assert registry.reload()
    stub = fake_stack.stub
    rng = np.random.default_rng(7)
    arm_of: dict[str, str] = {}
    event_number = 0
    for n in range(160):
        user = f"sim-{n}"
        response = await stub.Recommend(
            gateway_pb2.RecommendRequest(user_id=user, scenario="exp_home", num_items=5)
        )
        assert response.experiment == "rank_vs_recall" and response.arm in ("ranked", "recall_only")
        assert response.request_id  # generated when the caller sent none: events quote it
        arm_of[user] = response.arm
        clicks = []
        for item in response.items:
            if rng.random() < item_index(item.item_id) / 100:
                event_number += 1
                clicks.append(
                    gateway_pb2.Event(
                        event_id=f"e{event_number}",
                        user_id=user,
                        item_id=item.item_id,
                        type=common_pb2.CLICK,
                        scenario="exp_home",
                        request_id=response.request_id,
                    )
                )
        if clicks:
            await stub.LogEvents(gateway_pb2.LogEventsRequest(events=clicks))
            await stub.LogEvents(gateway_pb2.LogEventsRequest(events=clicks[:1]))  # a retry: not counted
    again = await stub.Recommend(
        gateway_pb2.RecommendRequest(user_id="sim-3", scenario="exp_home", num_items=5)
    )
    assert again.arm == arm_of["sim-3"]  # the same user stays in the same arm

    metrics = fake_stack.gateway.registry

    def value(name: str, arm: str) -> float:
        labels = {"scenario": "exp_home", "experiment": "rank_vs_recall", "arm": arm}
        return metrics.get_sample_value(name, labels) or 0.0

    ctr = {
        arm: value("recsys_clicks_total", arm) / value("recsys_impressions_total", arm)
        for arm in ("ranked", "recall_only")
    }
    shown = {arm: 5 * list(arm_of.values()).count(arm) for arm in ("ranked", "recall_only")}
    assert value("recsys_impressions_total", "ranked") == shown["ranked"] + 5 * (arm_of["sim-3"] == "ranked")
    assert ctr["ranked"] > 0.3 and ctr["recall_only"] < 0.1, ctr  # expected ~0.47 vs ~0.02


async def test_outcomes_are_attributed_only_to_what_the_user_was_shown(fake_stack: FakeStack):
    registry = fake_stack.gateway.scenarios
    stub = fake_stack.stub
    response = await stub.Recommend(
        gateway_pb2.RecommendRequest(request_id="req-1", user_id="u1", scenario="home", num_items=5)
    )
    shown = response.items[0].item_id
    not_shown = next(f"i{n}" for n in range(200) if f"i{n}" not in {i.item_id for i in response.items})

    def outcome(event_id: str, user: str, item: str, kind=common_pb2.CLICK, request_id: str = "req-1"):
        return gateway_pb2.Event(
            event_id=event_id, user_id=user, item_id=item, type=kind, scenario="home", request_id=request_id
        )

    await stub.LogEvents(
        gateway_pb2.LogEventsRequest(
            events=[
                outcome("o1", "u1", shown),
                outcome("o2", "u2", shown),  # another user's request
                outcome("o3", "u1", not_shown),  # not in the answer
                outcome("o4", "u1", shown, common_pb2.PURCHASE),
                outcome("o5", "u1", shown, common_pb2.VIEW),  # not an outcome
            ]
        )
    )
    metrics = fake_stack.gateway.registry
    labels = {"scenario": "home", "experiment": "", "arm": ""}
    assert metrics.get_sample_value("recsys_impressions_total", labels) == 5
    assert metrics.get_sample_value("recsys_clicks_total", labels) == 1
    assert metrics.get_sample_value("recsys_conversions_total", {**labels, "type": "purchase"}) == 1
    # An answer served by another replica (unknown request id here) is credited by the scenario
    # the event names; the arm would be the user's hash bucket.
    await stub.LogEvents(
        gateway_pb2.LogEventsRequest(events=[outcome("o6", "u9", "i1", request_id="elsewhere")])
    )
    assert metrics.get_sample_value("recsys_clicks_total", labels) == 2
    assert registry.current.get("home").experiment is None


def test_the_shipped_exploration_example_is_an_experiment_with_an_explore_arm():
    home = load_scenarios(DEFAULT_SCENARIOS_FILE.parent / "examples" / "exploration.yaml").get("home")
    assert home.experiment is not None
    arms = {arm.name: arm.scenario for arm in home.experiment.arms}
    assert set(arms) == {"control", "explore"}
    assert [rule.name for rule in arms["explore"].rerank.rules][-1] == "explore"
    assert "explore" not in [rule.name for rule in arms["control"].rerank.rules]


def test_the_ablation_example_starts_from_the_shipped_home():
    """config/examples/ablation-home.yaml measures the shipped home: its `shipped` arm must be it."""
    shipped = load_scenarios(DEFAULT_SCENARIOS_FILE).get("home")
    ablation = load_scenarios(DEFAULT_SCENARIOS_FILE.parent / "examples" / "ablation-home.yaml").get("home")
    arms = {arm.name: arm.scenario for arm in ablation.experiment.arms}
    assert arms["shipped"].stages == shipped.stages
    assert arms["no_rank"].rank is None and arms["no_rules"].rerank is None
