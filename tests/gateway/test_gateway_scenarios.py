"""Scenario config: the shipped file loads; pipelines that do not fit are rejected at load time
with the scenario and stage named; the registry reloads on change and keeps the old config when
the new one is invalid; its watcher survives any error (counted) and stops cleanly."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import yaml

from gateway.config import DEFAULT_SCENARIOS
from gateway.scenarios import ScenarioRegistry
from gateway.server import serve
from recsys.scenario.config import load_scenarios, parse_scenarios
from recsys.scenario.rules import DiversityRule, DropPurchasedRule, RevenueRule
from recsys.scenario.spec import ScenarioConfigError
from recsys.serving.metrics import new_registry
from recsys.v1 import rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import eventually, gateway_config
from tests.gateway.fakes import FakeRank, FakeRecall, FakeServer


def one(stages: list, **scenario) -> dict:
    return {"version": 1, "scenarios": {"s": {"stages": stages, **scenario}}}


RECALL = {"recall": {"sources": {"u2i": 50}, "k": 50}}


def test_shipped_config_declares_the_five_scenarios_with_their_request_requirements():
    config = load_scenarios(DEFAULT_SCENARIOS)
    assert set(config.scenarios) == {"home", "item_detail", "cart", "category", "ads"}
    assert config.scenarios["item_detail"].required_fields == {"user_id", "context.item_ids"}
    assert config.scenarios["category"].required_fields == {"user_id", "context.category"}
    assert config.scenarios["cart"].required_fields == {"user_id"}  # cart may come from history
    home_rules = config.scenarios["home"].rerank.rules
    assert any(isinstance(r, DiversityRule) for r in home_rules)
    assert any(isinstance(r, DropPurchasedRule) for r in home_rules)
    assert isinstance(config.scenarios["ads"].rerank.rules[0], RevenueRule)
    assert config.scenarios["ads"].recall.sponsored_only


def test_recall_may_use_the_bundles_default_source_mix():
    config = parse_scenarios(one([{"recall": {"k": 80}}]))
    assert config.scenarios["s"].recall.sources == ()
    assert config.scenarios["s"].recall.k == 80


def test_a_scenario_is_config_not_code():
    config = parse_scenarios(one([RECALL], personalised=False, model_scenario="home"))
    scenario = config.scenarios["s"]
    assert scenario.model_scenario_name == "home"
    assert scenario.required_fields == frozenset()
    assert scenario.rank is None and scenario.rerank is None


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"rank": {"max_candidates": 10}}, RECALL], "scenario 's', stage 'rank': needs ['candidates']"),
        (
            [RECALL, {"rerank": [{"revenue": {"floor": 0.1}}]}],
            "stage 'rerank': needs ['bids', 'rank_scores']",
        ),
        (
            [{"recall": {"sources": {"u2i": 10}}}, {"rank": {}}, {"rerank": [{"revenue": {}}]}],
            "needs ['bids'], which no earlier stage produces (bids comes from a recall stage with "
            "filters.sponsored_only: true)",
        ),
        ([{"rerank": [{"exclude_context": True}]}], "stage 'rerank': needs ['candidates']"),
        ([RECALL, RECALL], "stage 'recall': appears twice"),
        ([], "scenario 's': no stages"),
        ([{"recall": {"sources": {"i2i": 10}}}], "stage 'recall': source i2i needs seed items"),
        ([{"recall": {"sources": {"bogus": 10}}}], "unknown source 'bogus'"),
        ([{"recall": {"sources": {"u2i": 0}}}], "sources.u2i must be an integer in 1..10000"),
        ([{"recall": {"sources": ["u2i"]}}], "sources must map source -> quota"),
        ([{"recall": {"sources": "default"}}], "k is required with the default sources"),
        ([{"recall": {"sources": {"u2i": 10}, "k": 20000}}], "k must be an integer in 1..10000"),
        ([{"recall": {"sources": {"u2i": 10}, "kk": 1}}], "unknown field(s) ['kk']"),
        (
            [{"recall": {"sources": {"u2i": 10}, "filters": {"category": "shoes"}}}],
            "filters.category must be",
        ),
        ([RECALL, {"rerank": [{"diversity": {"top_n": 10}}]}], "set max_per_category and/or max_per_brand"),
        ([RECALL, {"rerank": [{"shuffle": {}}]}], "unknown rule 'shuffle'"),
        ([{"retrieve": {}}], "unknown stage 'retrieve'"),
        ([RECALL, {"rank": {"max_candidates": 6000}}], "max_candidates must be an integer in 1..5000"),
        ([{"recall": {"sources": {"u2i": 10}, "seeds": None}}], "seeds must be one of"),
    ],
)
def test_incompatible_or_invalid_pipelines_are_rejected_naming_scenario_and_stage(stages, message):
    with pytest.raises(ScenarioConfigError) as error:
        parse_scenarios(one(stages))
    assert message in str(error.value)
    assert "scenario 's'" in str(error.value)


def test_bad_top_level_documents_are_rejected():
    with pytest.raises(ScenarioConfigError, match="`scenarios` must map"):
        parse_scenarios({"version": 1})
    with pytest.raises(ScenarioConfigError, match="unsupported version"):
        parse_scenarios({"version": 2, "scenarios": {}})
    with pytest.raises(ScenarioConfigError, match="unknown field"):
        parse_scenarios({"scenarios": {"s": {"stages": [RECALL]}}, "extra": 1})


def test_invalid_yaml_names_the_file(tmp_path: Path):
    path = tmp_path / "scenarios.yaml"
    path.write_text("scenarios: [unclosed")
    with pytest.raises(ScenarioConfigError, match=r"scenarios\.yaml: invalid YAML"):
        load_scenarios(path)


def test_registry_reloads_on_change_and_keeps_the_old_config_when_the_new_one_is_invalid(tmp_path: Path):
    path = tmp_path / "scenarios.yaml"
    path.write_text(yaml.safe_dump(one([RECALL])))
    seen = []
    registry = ScenarioRegistry(path, on_reload=seen.append)
    first = registry.current
    assert registry.reload_if_changed() is None  # unchanged

    document = one([RECALL])
    document["scenarios"]["extra"] = {"stages": [RECALL]}
    path.write_text(yaml.safe_dump(document))
    os.utime(path, (1, 1))  # a distinct mtime even on coarse filesystems
    assert registry.reload_if_changed() is True
    assert set(registry.current.scenarios) == {"s", "extra"}
    assert registry.current.digest != first.digest
    assert seen == [registry.current]

    good = registry.current
    path.write_text(yaml.safe_dump(one([{"rank": {}}])))
    os.utime(path, (2, 2))
    assert registry.reload_if_changed() is False
    assert registry.current is good
    assert "stage 'rank'" in registry.last_error


def test_registry_refuses_to_start_on_an_invalid_file(tmp_path: Path):
    path = tmp_path / "scenarios.yaml"
    path.write_text(yaml.safe_dump(one([{"rank": {}}])))
    with pytest.raises(ScenarioConfigError, match="scenario 's', stage 'rank'"):
        ScenarioRegistry(path)


# `seeds:` left empty: the loader fails with a TypeError rather than a ScenarioConfigError.
EMPTY_SEEDS = """\
version: 1
scenarios:
  s:
    stages:
      - recall:
          sources: {i2i: 50}
          k: 50
          seeds:
"""


def edit(path: Path, text: str, mtime: int) -> None:
    path.write_text(text)
    os.utime(path, (mtime, mtime))  # a distinct mtime even on coarse filesystems


async def test_the_watcher_survives_any_reload_error_and_applies_the_next_valid_edit(tmp_path: Path):
    path = tmp_path / "scenarios.yaml"
    edit(path, yaml.safe_dump(one([RECALL])), 1)
    errors: list[str] = []
    installed: list[str] = []

    def on_reload(current) -> None:
        installed.append(current.digest)
        if len(installed) == 1:
            raise RuntimeError("a failing reload hook")

    registry = ScenarioRegistry(path, poll_interval_s=0.01, on_reload=on_reload, on_error=errors.append)
    first = registry.current
    watcher = asyncio.ensure_future(registry.watch())
    try:
        edit(path, EMPTY_SEEDS, 2)
        await eventually(lambda: registry.last_error is not None)
        assert registry.current is first and len(errors) == 1
        assert str(path) in registry.last_error

        edit(path, yaml.safe_dump(one([{"rank": {}}])), 3)  # an invalid pipeline: rejected too
        await eventually(lambda: len(errors) == 2)
        assert "stage 'rank'" in registry.last_error

        extra = one([RECALL])
        extra["scenarios"]["extra"] = {"stages": [RECALL]}
        edit(path, yaml.safe_dump(extra), 4)  # valid, but the hook fails: installed, error kept
        await eventually(lambda: len(errors) == 3)
        assert set(registry.current.scenarios) == {"s", "extra"}
        assert "RuntimeError: a failing reload hook" in registry.last_error

        edit(path, yaml.safe_dump(one([RECALL], timeout_ms=250)), 5)  # the next valid edit
        await eventually(lambda: registry.current.scenarios["s"].timeout_ms == 250)
        assert registry.last_error is None and not watcher.done()
    finally:
        watcher.cancel()
    with pytest.raises(asyncio.CancelledError):  # cancelled cleanly, not died of an error
        await watcher


async def test_the_gateway_counts_reload_errors_keeps_watching_and_stops_cleanly(tmp_path: Path):
    path = tmp_path / "scenarios.yaml"
    edit(path, DEFAULT_SCENARIOS.read_text(), 1)
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    registry = new_registry(False)
    config = gateway_config(
        tmp_path, recall.address, rank.address, scenarios_path=path, reload_interval_s=0.02
    )
    gateway = await serve(config, registry)
    try:
        first = gateway.scenarios.current.digest
        edit(path, EMPTY_SEEDS, 2)
        await eventually(lambda: registry.get_sample_value("recsys_scenario_reload_errors_total") == 1)
        assert gateway.scenarios.current.digest == first

        edit(path, DEFAULT_SCENARIOS.read_text() + "\n# edited\n", 3)
        await eventually(lambda: gateway.scenarios.current.digest != first)
        assert gateway.scenarios.last_error is None
    finally:
        await gateway.stop(0)  # raises if the watcher task died
        await recall.stop()
        await rank.stop()
