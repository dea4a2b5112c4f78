"""Offline evaluation of the recall stage through :class:`RecallEngine` (the code the service runs).

Stages (full-ranking leave-one-out protocol, history excluded, HR/NDCG at 10..500):
``recall`` = the u2i source alone, ``covisit`` = the co-visitation source alone, ``candidates`` =
the merged list of the scenario's default sources (what the gateway hands to rank). Each query is
made in the scenario of the user's target event when the data records scenarios (the user tower
takes it as input), else in ``home`` (Beauty).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from recall_service.engine import RecallEngine, RecallQuery
from recall_service.export import covisit_settings
from recall_service.sources import interaction_tables
from recsys.bundle import MANIFEST
from recsys.data.dataset import Dataset
from recsys.data.split import LeaveOneOutSplit, Phase
from recsys.evaluation.protocol import evaluate_lists

log = logging.getLogger(__name__)

RECALL_KS: tuple[int, ...] = (10, 20, 50, 100, 200, 500)
# stage -> the sources it asks for (empty = the scenario's defaults); per-source stages get no
# popularity top-up so that they measure that source alone.
STAGE_SOURCES: dict[str, tuple[str, ...]] = {"recall": ("u2i",), "covisit": ("covisit",), "candidates": ()}


def ensure_bundle(dataset: Dataset, artifacts_dir: Path, quick: bool) -> Path:
    """``artifacts_dir/recall``, trained and exported first when missing or built from other data."""
    bundle_dir = Path(artifacts_dir) / "recall"
    manifest_path = bundle_dir / MANIFEST
    if manifest_path.is_file():
        import json

        fingerprint = json.loads(manifest_path.read_text()).get("data_fingerprint")
        if fingerprint == dataset.fingerprint():
            return bundle_dir
        log.warning("recall bundle %s was built from other data (%s); rebuilding", bundle_dir, fingerprint)
    from recall_service.train import RecallTrainConfig, build_bundle

    config = RecallTrainConfig.quick() if quick else RecallTrainConfig.default()
    return build_bundle(dataset, bundle_dir, config)


def stage_queries(
    dataset: Dataset, split: LeaveOneOutSplit, users: np.ndarray, phase: Phase, stage: str, k: int, home: int
) -> list[RecallQuery]:
    """One query per user: their history before the ``phase`` target, in the target's scenario."""
    sources = STAGE_SOURCES[stage]
    queries = []
    for user in users:
        history = split.history(int(user), phase)
        scenario = home if dataset.scenarios is None else int(dataset.scenarios[int(user)][len(history)])
        queries.append(
            RecallQuery(
                history=history,
                event_types=dataset.events_of(int(user))[: len(history)],
                scenario=scenario,
                quotas={source: k for source in sources},
                k=k,
                fill_popular=not sources,
            )
        )
    return queries


def tables_for_phase(engine: RecallEngine, dataset: Dataset, split: LeaveOneOutSplit, phase: Phase) -> None:
    """Make ``engine`` answer ``phase`` without seeing its targets. A bundle counts co-visitation
    and popularity over everything but each user's test item (``tables_exclude`` in its manifest;
    right for the test phase), so for the validation phase each target's own transition from the
    item before it would be in the table (Beauty's served home: HR@10 0.51 instead of ~0.12).
    There the tables are rebuilt from the training items alone, with the bundle's settings."""
    if phase != "valid":
        return
    from recall_service.train import RecallTrainConfig

    settings = {**covisit_settings(RecallTrainConfig()), **engine.manifest.get("covisit", {})}
    sequences = [split.train_sequence(user) for user in range(dataset.num_users)]
    covisit, popularity = interaction_tables(
        sequences, engine.num_items, engine.item_category, len(engine.category_names), settings
    )
    engine.use_interaction_tables(covisit, popularity)
    log.info("validation phase: co-visitation and popularity counted over training items only")


def evaluate_stages(
    dataset: Dataset,
    split: LeaveOneOutSplit,
    artifacts_dir: Path,
    phase: Phase = "test",
    quick: bool = False,
    threads: int = 2,
    users: np.ndarray | None = None,
) -> dict[str, dict]:
    """HR/NDCG at 10..500 of the recall stages (see module doc); builds the bundle if missing."""
    bundle_dir = ensure_bundle(dataset, artifacts_dir, quick)
    engine = RecallEngine.load(bundle_dir, device="auto", threads=threads)
    tables_for_phase(engine, dataset, split, phase)
    home = engine.scenarios.index("home") if "home" in engine.scenarios else 0
    k = max(RECALL_KS)
    results: dict[str, dict] = {}
    for stage in STAGE_SOURCES:
        started = time.perf_counter()

        def recommend(batch: np.ndarray, batch_phase: Phase, stage: str = stage) -> list[np.ndarray]:
            queries = stage_queries(dataset, split, batch, batch_phase, stage, k, home)
            return [candidates.items for candidates in engine.recall(queries)]

        results[stage] = evaluate_lists(recommend, split, phase, ks=RECALL_KS, batch_size=512, users=users)
        log.info(
            "stage %s (%s): HR@10 %.4f NDCG@10 %.4f HR@500 %.4f in %.1f s",
            stage,
            phase,
            results[stage]["HR@10"],
            results[stage]["NDCG@10"],
            results[stage]["HR@500"],
            time.perf_counter() - started,
        )
    return results
