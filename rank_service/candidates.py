"""Recall's candidates for offline work (training lists, pipeline evaluation), through the same
``RecallEngine`` the recall service runs. No torch.

Two ways to ask: ``k`` = the recall bundle's own source mix top-``k`` (``pipeline_offline``), or
``k=None`` = what the compiled scenario's recall stage asks the recall service for when it serves
that scenario (its sources and quotas, ``k``, seeds, history/context exclusions), cut to the rank
stage's ``max_candidates``: the lists the ranker sees in production. Offline, the "viewed item"
or cart of a seeded scenario is the last history item (as ``recsys eval --scenario`` asks).
Category pages are not restricted to a category here (the page is not known for a training
prefix)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from rank_service.features import SOURCES
from rank_service.runtime import RankQuery
from recsys.data.dataset import DEFAULT_SCENARIOS, EventType
from recsys.scenario.config import DEFAULT_SCENARIOS_FILE, Scenario, ScenarioSet, load_scenarios
from recsys.scenario.stages import MAX_SEEDS, RecallStage, recall_sources


@dataclass
class Candidates:
    """One recall answer: dense items best first with recall's per-source features."""

    items: np.ndarray  # int64
    scores: np.ndarray  # float32, the best source's score
    source_scores: np.ndarray  # [n, len(SOURCES)] float32
    source_mask: np.ndarray  # [n, len(SOURCES)] bool

    def query(self, history: np.ndarray, event_types: np.ndarray | None, scenario: int) -> RankQuery:
        return RankQuery(
            history=history,
            event_types=event_types,
            scenario=scenario,
            candidates=self.items,
            recall_scores=self.scores,
            source_scores=self.source_scores,
            source_mask=self.source_mask,
        )


class CandidateSource(Protocol):
    """Anything that returns top-``k`` candidates for histories (the recall engine, test stubs)."""

    def generate(
        self,
        histories: Sequence[np.ndarray],
        events: Sequence[np.ndarray],
        scenarios: Sequence[str],
        k: int | None,
    ) -> list[Candidates]: ...


def served_scenario(scenario_set: ScenarioSet, model_scenario: str) -> Scenario:
    """The scenario of the file that serves the model scenario ``model_scenario``: the one of
    that name, else the first that maps to it, else ``home`` (else the first)."""
    named = scenario_set.get(model_scenario)
    if named is not None:
        return named
    scenarios = list(scenario_set.scenarios.values())
    mapped = [s for s in scenarios if s.model_scenario_name == model_scenario]
    return mapped[0] if mapped else scenario_set.get("home") or scenarios[0]


def cart_of(history: np.ndarray, event_types: np.ndarray) -> np.ndarray:
    """Items added to the cart and not purchased since, newest first (dense ids)."""
    in_cart: dict[int, None] = {}
    for item, event_type in zip(history.tolist(), event_types.tolist(), strict=True):
        if event_type == EventType.ADD_TO_CART:
            in_cart.pop(item, None)
            in_cart[item] = None
        elif event_type == EventType.PURCHASE:
            in_cart.pop(item, None)
    return np.asarray(list(reversed(in_cart)), dtype=np.int64)


def stage_seeds(stage: RecallStage, history: np.ndarray, event_types: np.ndarray) -> np.ndarray:
    """The stage's seed items offline: the first seed source that yields any (context.item_ids
    = the last history item)."""
    for seed_source in stage.seeds:
        if seed_source == "context.item_ids":
            seeds = history[-1:]
        elif seed_source == "history.cart":
            seeds = cart_of(history, event_types)
        else:  # history.recent
            seeds = np.asarray(list(dict.fromkeys(history[::-1].tolist())), dtype=np.int64)
        if len(seeds):
            return np.asarray(seeds[:MAX_SEEDS], dtype=np.int64)
    return np.zeros(0, dtype=np.int64)


class RecallCandidates:
    """Candidates from a recall bundle through ``recall_service.engine.RecallEngine``, as the
    scenario set's recall stages ask for them (``generate(..., k=None)``) or as the bundle's own
    mix (``k``); the scenario set (default: the shipped file) also says which scenarios' requests
    carry the viewed item or cart as seeds."""

    def __init__(self, engine, batch_size: int = 256, scenarios: ScenarioSet | None = None):
        from recall_service.engine import SOURCES as RECALL_SOURCES

        if tuple(RECALL_SOURCES) != SOURCES:
            raise ValueError(f"recall sources {RECALL_SOURCES} differ from the ranker's {SOURCES}")
        self.engine = engine
        self.batch_size = batch_size
        self.scenarios = scenarios if scenarios is not None else load_scenarios(DEFAULT_SCENARIOS_FILE)

    @classmethod
    def load(
        cls, bundle_dir: Path, threads: int = 2, scenarios: ScenarioSet | None = None
    ) -> RecallCandidates:
        from recall_service.engine import RecallEngine

        return cls(RecallEngine.load(bundle_dir, "cpu", threads), scenarios=scenarios)

    @property
    def version(self) -> str:
        return str(self.engine.version)

    def _query(self, history: np.ndarray, event_types: np.ndarray, scenario: str, k: int | None):
        """The engine query (and how many of its candidates rank sees) for one list."""
        from recall_service.engine import RecallQuery

        known = list(self.engine.scenarios)
        history = np.asarray(history, dtype=np.int64)
        event_types = np.asarray(event_types, dtype=np.int64)
        served = served_scenario(self.scenarios, scenario)
        if k is not None:  # the bundle's own mix; the viewed item / cart as seeds where served so
            name = scenario if scenario in known else known[0]
            seeds = history[-1:] if served.takes_context_items else history[:0]
            query = RecallQuery(history, event_types, known.index(name), seeds, quotas={}, k=k)
            return query, k
        stage, rank = served.recall, served.rank
        model_scenario = served.model_scenario_name
        seeds = stage_seeds(stage, history, event_types)
        context = history[-1:] if "context.item_ids" in stage.seeds else history[:0]
        query = RecallQuery(
            history=history,
            event_types=event_types,
            scenario=known.index(model_scenario) if model_scenario in known else 0,
            seed_items=seeds,
            quotas=dict(recall_sources(stage, seeds.tolist())),
            k=stage.k,
            exclude_history=stage.exclude_history,
            exclude_items=context if stage.exclude_context else history[:0],
            sponsored_only=stage.sponsored_only,
        )
        return query, stage.k if rank is None else min(stage.k, rank.max_candidates)

    def generate(
        self,
        histories: Sequence[np.ndarray],
        events: Sequence[np.ndarray],
        scenarios: Sequence[str],
        k: int | None,
    ) -> list[Candidates]:
        """One candidate list per history: the bundle mix top-``k``, or (``k=None``) what the
        scenario set's recall stage for each list's scenario asks for."""
        results: list[Candidates] = []
        for start in range(0, len(histories), self.batch_size):
            asked = [
                self._query(history, event_types, scenario, k)
                for history, event_types, scenario in zip(
                    histories[start : start + self.batch_size],
                    events[start : start + self.batch_size],
                    scenarios[start : start + self.batch_size],
                    strict=True,
                )
            ]
            answers = self.engine.recall([query for query, _ in asked])
            for answer, (_, count) in zip(answers, asked, strict=True):
                results.append(
                    Candidates(
                        items=np.asarray(answer.items[:count], dtype=np.int64),
                        scores=np.asarray(answer.scores[:count], dtype=np.float32),
                        source_scores=np.asarray(answer.source_scores[:count], dtype=np.float32),
                        source_mask=np.asarray(answer.source_mask[:count], dtype=bool),
                    )
                )
        return results


def scenario_names(dataset_scenarios: Sequence[str] | None) -> list[str]:
    return list(dataset_scenarios) if dataset_scenarios else list(DEFAULT_SCENARIOS)
