"""`recsys eval --stage pipeline_offline`: recall top-K re-ranked by the ranker, through the code the
services run (``RecallEngine`` + ``RankRuntime``), under the shared full-ranking protocol (items
outside the recall list are ranked after it). Reports the recall stages it was built on too."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from rank_service.candidates import RecallCandidates
from rank_service.runtime import RankRuntime
from recsys.data.dataset import Dataset
from recsys.data.split import LeaveOneOutSplit, Phase

log = logging.getLogger(__name__)

PIPELINE_KS = (10, 20, 50)


def ensure_rank_bundle(dataset: Dataset, artifacts_dir: Path, quick: bool) -> Path:
    """``artifacts_dir/rank``, trained (and the recall bundle under it built) when missing."""
    bundle_dir = Path(artifacts_dir) / "rank"
    if (bundle_dir / "manifest.json").is_file():
        return bundle_dir
    from rank_service.train import RankTrainConfig, build_bundle, ensure_recall_bundle

    recall_dir = ensure_recall_bundle(dataset, Path(artifacts_dir) / "recall", quick)
    log.info("no rank bundle at %s: training it", bundle_dir)
    config = RankTrainConfig.quick() if quick else RankTrainConfig.default()
    return build_bundle(dataset, recall_dir, bundle_dir, config)


def evaluate_pipeline(
    dataset: Dataset,
    split: LeaveOneOutSplit,
    recall_dir: Path,
    rank_dir: Path,
    phase: Phase,
    k: int | None = None,
    threads: int = 2,
) -> dict[str, float]:
    """Metrics of recall top-``k`` (the bundle's training K by default) re-ranked by the runtime."""
    from rank_service.train import eval_lists, pipeline_metrics
    from recall_service.evaluate import tables_for_phase

    runtime = RankRuntime.load(rank_dir, device="cpu", threads=threads)
    # pipeline_offline is the bundle mix: top-K as the ranker was validated on it, else 200
    k = k or int(runtime.manifest.get("train", {}).get("config", {}).get("pipeline_candidates") or 200)
    source = RecallCandidates.load(recall_dir, threads=threads)
    tables_for_phase(source.engine, dataset, split, phase)
    users = split.eval_users
    started = time.perf_counter()
    lists = eval_lists(dataset, split, source, phase, users, k)
    recall_seconds = time.perf_counter() - started

    def score_lists(histories, events, scenarios, candidate_lists):
        queries = [
            candidates.query(history, event_types, scenario)
            for history, event_types, scenario, candidates in zip(
                histories, events, scenarios, candidate_lists, strict=True
            )
        ]
        return runtime.score(queries)

    started = time.perf_counter()
    metrics = pipeline_metrics(dataset, split, phase, users, lists, score_lists, PIPELINE_KS)
    metrics.update(
        {
            "K": k,
            "candidates_mean": float(np.mean([len(c.items) for c in lists])),
            "recall_seconds": round(recall_seconds, 1),
            "rank_seconds": round(time.perf_counter() - started, 1),
            "rank_version": runtime.version,
            "recall_version": source.version,
            "rank_train_seconds": runtime.manifest.get("train", {}).get("train_seconds"),
        }
    )
    return metrics


def evaluate_stages(
    dataset: Dataset, split: LeaveOneOutSplit, artifacts_dir: Path, phase: Phase, quick: bool
) -> dict[str, dict]:
    """``{"recall", "covisit", "candidates", "pipeline_offline"}`` metrics; builds missing bundles.

    ``pipeline_offline`` is the bundle's own source mix, top-K re-ranked, no re-rank rules: what
    the ranker alone adds. What the gateway serves is ``recsys eval --stage pipeline`` (the
    ``home`` scenario, through ``recsys.app.scenario_eval``)."""
    from recall_service.evaluate import evaluate_stages as evaluate_recall_stages

    rank_dir = ensure_rank_bundle(dataset, artifacts_dir, quick)
    stages = dict(evaluate_recall_stages(dataset, split, artifacts_dir, phase, quick))
    stages["pipeline_offline"] = evaluate_pipeline(
        dataset, split, Path(artifacts_dir) / "recall", rank_dir, phase
    )
    return stages
