"""Recall's candidates for offline work (training lists, pipeline evaluation), through the same
``RecallEngine`` the recall service runs. No torch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from rank_service.features import SOURCES
from rank_service.runtime import RankQuery
from recsys.data.dataset import DEFAULT_SCENARIOS

# Scenarios whose requests carry the viewed item / cart as seeds (i2i, covisit of the seeds).
SEEDED_SCENARIOS = ("item_detail", "cart")


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
        self, histories: Sequence[np.ndarray], events: Sequence[np.ndarray], scenarios: Sequence[str], k: int
    ) -> list[Candidates]: ...


class RecallCandidates:
    """Candidates from a recall bundle through ``recall_service.engine.RecallEngine``."""

    def __init__(self, engine, batch_size: int = 256):
        from recall_service.engine import SOURCES as RECALL_SOURCES

        if tuple(RECALL_SOURCES) != SOURCES:
            raise ValueError(f"recall sources {RECALL_SOURCES} differ from the ranker's {SOURCES}")
        self.engine = engine
        self.batch_size = batch_size

    @classmethod
    def load(cls, bundle_dir: Path, threads: int = 2) -> RecallCandidates:
        from recall_service.engine import RecallEngine

        return cls(RecallEngine.load(bundle_dir, "cpu", threads))

    @property
    def version(self) -> str:
        return str(self.engine.version)

    def generate(
        self, histories: Sequence[np.ndarray], events: Sequence[np.ndarray], scenarios: Sequence[str], k: int
    ) -> list[Candidates]:
        from recall_service.engine import RecallQuery

        known = list(self.engine.scenarios)
        results: list[Candidates] = []
        for start in range(0, len(histories), self.batch_size):
            queries = []
            for history, event_types, scenario in zip(
                histories[start : start + self.batch_size],
                events[start : start + self.batch_size],
                scenarios[start : start + self.batch_size],
                strict=True,
            ):
                name = scenario if scenario in known else known[0]
                seeds = history[-1:] if name in SEEDED_SCENARIOS and len(history) else history[:0]
                queries.append(
                    RecallQuery(
                        history=np.asarray(history, dtype=np.int64),
                        event_types=np.asarray(event_types, dtype=np.int64),
                        scenario=known.index(name),
                        seed_items=np.asarray(seeds, dtype=np.int64),
                        quotas={},
                        k=k,
                    )
                )
            for answer in self.engine.recall(queries):
                results.append(
                    Candidates(
                        items=np.asarray(answer.items, dtype=np.int64),
                        scores=np.asarray(answer.scores, dtype=np.float32),
                        source_scores=np.asarray(answer.source_scores, dtype=np.float32),
                        source_mask=np.asarray(answer.source_mask, dtype=bool),
                    )
                )
        return results


def scenario_names(dataset_scenarios: Sequence[str] | None) -> list[str]:
    return list(dataset_scenarios) if dataset_scenarios else list(DEFAULT_SCENARIOS)
