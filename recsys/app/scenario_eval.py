"""Evaluate what a scenario SERVES: the gateway's own pipeline, in process, under the eval protocol.

Each evaluated user becomes a stateless ``Recommend`` request (the user's history before the
target) for the named scenario of the scenario file, answered by the very
:class:`recsys.scenario.pipeline.Pipeline` the gateway runs, over in-process recall and rank backends
(``recsys.app.inprocess``: the services' own servicers, batchers, engines and packed wire) — so the
number is the quality of what the gateway returns, re-rank rules included. Scenario contexts:
``item_detail`` views the user's last history item, ``cart`` holds it, ``category`` is the
target's category page (users whose target has no category are skipped and counted). Budgets are
lifted (a slow offline machine must not turn answers into fallbacks); any degraded answer is
counted in the result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rank_service.config import RankConfig
from recall_service.config import RecallConfig
from recall_service.engine import RecallEngine
from recall_service.evaluate import tables_for_phase
from recsys.app.inprocess import load_backends
from recsys.data.dataset import Dataset
from recsys.data.split import LeaveOneOutSplit, Phase
from recsys.evaluation.protocol import metrics_from_ranks, ranks_from_lists
from recsys.scenario.config import Scenario, load_scenarios
from recsys.scenario.context import RecommendInputs, RecommendResult
from recsys.scenario.pipeline import Pipeline, ScenarioMetrics
from recsys.scenario.stages import RankStage, RecallStage
from recsys.serving.config import ServingConfig
from recsys.serving.metrics import new_registry
from recsys.v1 import common_pb2

log = logging.getLogger(__name__)

EVAL_KS = (10, 20, 50)
NUM_ITEMS = max(EVAL_KS)  # items asked of each scenario (its re-rank rules still apply to them)
NO_BUDGET_MS = 600_000.0
CONCURRENCY = 32  # requests in flight, so the recall and rank batchers batch as in serving
COLD_INTERACTIONS = 5  # cold_share@10: items with at most this many training interactions


def without_budgets(scenario: Scenario) -> Scenario:
    """``scenario`` with every time budget lifted (the same stages, rules and sizes)."""
    stages = tuple(
        dataclasses.replace(stage, timeout_ms=NO_BUDGET_MS)
        if isinstance(stage, RecallStage | RankStage)
        else stage
        for stage in scenario.stages
    )
    return dataclasses.replace(scenario, stages=stages, timeout_ms=NO_BUDGET_MS)


def scenario_request(
    dataset: Dataset, scenario: Scenario, user: int, history: np.ndarray, target: int, num_items: int
) -> RecommendInputs | None:
    """The stateless request that asks ``scenario`` for ``user``; None when the scenario cannot
    be asked for this user (a category page for a target without a category)."""
    items = dataset.items
    events = dataset.events_of(user)[: len(history)]
    history_items = tuple(
        common_pb2.HistoryItem(item_id=items.external(int(item)), type=int(event) or common_pb2.VIEW)
        for item, event in zip(history, events, strict=True)
    )
    context_items: tuple[str, ...] = ()
    category = ""
    if scenario.takes_context_items:
        if not len(history):
            return None
        context_items = (items.external(int(history[-1])),)
    if "context.category" in scenario.required_fields:
        if dataset.catalog.category is None:
            return None
        category_id = int(dataset.catalog.category[target])
        if category_id < 0:
            return None
        category = dataset.catalog.category_names[category_id]
    return RecommendInputs(
        scenario=scenario,
        user_id=dataset.users.external(user),
        num_items=num_items,
        context_item_ids=context_items,
        context_category=category,
        history=history_items,
    )


class OfflinePipeline:
    """The gateway's pipeline over in-process recall and rank, for stateless requests."""

    def __init__(self, pipeline: Pipeline, scenarios_path: Path):
        self.pipeline = pipeline
        self.scenarios = load_scenarios(scenarios_path)

    @classmethod
    async def load(
        cls,
        recall_dir: Path,
        rank_dir: Path,
        scenarios_path: Path,
        prepare_recall: Callable[[RecallEngine], None] | None = None,
    ) -> OfflinePipeline:
        """Both bundles in process; ``prepare_recall`` adjusts the recall engine before the
        pipeline reads its catalog (the validation phase's training-only tables)."""
        registry = new_registry(False)
        serving = ServingConfig()
        recall, rank = await load_backends(
            RecallConfig(serving=serving, bundle=recall_dir, device="cpu"),
            RankConfig(serving=serving, bundle=rank_dir, device="cpu"),
            registry,
        )
        if prepare_recall is not None:
            prepare_recall(recall.servicer.engine)
        pipeline = Pipeline(recall, rank, None, ScenarioMetrics(registry), max_history_length=1000)
        if not await pipeline.refresh_catalog():
            raise RuntimeError("the in-process recall backend did not serve its catalog")
        return cls(pipeline, scenarios_path)

    @property
    def versions(self) -> dict[str, str]:
        return {
            "recall_version": self.pipeline.recall.servicer.engine.version,
            "rank_version": self.pipeline.rank.servicer.runtime.version,
        }

    def scenario(self, name: str) -> Scenario:
        """Scenario ``name`` of the file, budgets lifted."""
        scenario = self.scenarios.get(name)
        if scenario is None:
            raise ValueError(f"unknown scenario {name!r}; known: {sorted(self.scenarios.scenarios)}")
        return without_budgets(scenario)

    async def serve(self, inputs: RecommendInputs) -> RecommendResult:
        return await self.pipeline.run(inputs, time.monotonic() + NO_BUDGET_MS / 1000)

    async def close(self) -> None:
        await self.pipeline.close()


def variants(scenario: Scenario) -> dict[str, Scenario]:
    """What to evaluate for a scenario of the file: itself, or each arm of its experiment
    (``name/arm``), so an experiment is measured offline before it runs online."""
    if scenario.experiment is None:
        return {scenario.name: scenario}
    return {f"{scenario.name}/{arm.name}": arm.scenario for arm in scenario.experiment.arms}


def coverage_metrics(ranked: Sequence[np.ndarray], interactions: np.ndarray, num_items: int) -> dict:
    """Catalog coverage of the served top 10s and the share of their slots held by items with at
    most COLD_INTERACTIONS training interactions (what exploration trades quality for)."""
    tops = [items[:10] for items in ranked]
    served = np.concatenate(tops) if tops else np.zeros(0, np.int64)
    metrics = {"coverage@10": round(len(np.unique(served)) / max(num_items, 1), 4)}
    if len(interactions) and len(served):
        metrics["cold_share@10"] = round(float((interactions[served] <= COLD_INTERACTIONS).mean()), 4)
    return metrics


async def evaluate_scenarios(
    dataset: Dataset,
    split: LeaveOneOutSplit,
    recall_dir: Path,
    rank_dir: Path,
    scenario_names: Sequence[str],
    scenarios_path: Path,
    phase: Phase,
    users: np.ndarray | None = None,
) -> dict[str, dict]:
    """``{scenario: metrics}`` of what each scenario serves (``{scenario/arm: metrics}`` for each
    arm of a scenario that runs an experiment), through the compiled scenario the gateway runs."""
    offline = await OfflinePipeline.load(
        recall_dir,
        rank_dir,
        scenarios_path,
        prepare_recall=lambda engine: tables_for_phase(engine, dataset, split, phase),
    )
    catalog = offline.pipeline.catalog
    assert catalog is not None
    check_catalog_is_dataset(dataset, catalog.item_ids)
    users = split.eval_users if users is None else users
    results: dict[str, dict] = {}
    for name in scenario_names:
        for key, scenario in variants(offline.scenario(name)).items():
            results[key] = await _evaluate_variant(offline, dataset, split, scenario, phase, users)
            log.info("scenario %s: %s", key, results[key])
    await offline.close()
    return results


async def _evaluate_variant(
    offline: OfflinePipeline,
    dataset: Dataset,
    split: LeaveOneOutSplit,
    scenario: Scenario,
    phase: Phase,
    users: np.ndarray,
) -> dict:
    started = time.perf_counter()
    ranked: list[np.ndarray] = []
    targets: list[int] = []
    degraded = skipped = 0

    async def serve(user: int) -> tuple[np.ndarray, bool] | None:
        history = split.history(user, phase)
        target = split.target(user, phase)
        inputs = scenario_request(dataset, scenario, user, history, target, NUM_ITEMS)
        if inputs is None:
            return None
        result = await offline.serve(inputs)
        # Catalog indices are the dataset's dense ids (same catalog, same order).
        return result.candidates.items.astype(np.int64), result.degraded

    for start in range(0, len(users), CONCURRENCY):
        batch = [int(u) for u in users[start : start + CONCURRENCY]]
        answers = await asyncio.gather(*(serve(user) for user in batch))
        for user, answer in zip(batch, answers, strict=True):
            if answer is None:
                skipped += 1
                continue
            ranked.append(answer[0])
            targets.append(split.target(user, phase))
            degraded += answer[1]
    if not targets:  # e.g. category pages on a dataset without categories
        return {"users": 0, "skipped_users": skipped, "note": "no user could be asked"}
    catalog = offline.pipeline.catalog
    assert catalog is not None
    metrics: dict = metrics_from_ranks(ranks_from_lists(ranked, np.asarray(targets)), EVAL_KS)
    metrics.update(coverage_metrics(ranked, catalog.item_interactions, len(catalog)))
    metrics.update(
        {
            "users": len(targets),
            "skipped_users": skipped,
            "degraded_answers": degraded,
            "num_items": NUM_ITEMS,
            "seconds": round(time.perf_counter() - started, 1),
            **offline.versions,
        }
    )
    return metrics


def check_catalog_is_dataset(dataset: Dataset, item_ids: Sequence[str]) -> None:
    """The bundle's catalog must be the dataset's item list, in order (indices = dense ids)."""
    if list(item_ids) != dataset.items.ids:
        raise RuntimeError("the bundles' catalog is not this dataset's item list: rebuild them")


def evaluate(
    dataset: Dataset,
    split: LeaveOneOutSplit,
    artifacts_dir: Path,
    scenario_names: Sequence[str],
    scenarios_path: Path | None,
    phase: Phase,
    quick: bool,
) -> dict[str, dict]:
    """The ``recsys eval --scenario`` plug-in: builds missing bundles, then evaluates each scenario."""
    from gateway.config import DEFAULT_SCENARIOS
    from rank_service.evaluate import ensure_rank_bundle

    rank_dir = ensure_rank_bundle(dataset, artifacts_dir, quick)
    return asyncio.run(
        evaluate_scenarios(
            dataset,
            split,
            Path(artifacts_dir) / "recall",
            rank_dir,
            scenario_names,
            scenarios_path or DEFAULT_SCENARIOS,
            phase,
        )
    )
