"""Full-ranking metrics: HR@K, NDCG@K, MRR with pessimistic ties and history excluded.

A target's rank (0-based) counts every other item scoring strictly higher OR EQUAL, so a
constant scorer gets nothing. For stages that return a ranked list (recall candidates), items
outside the list are ranked after it: a target absent from the list never hits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from tqdm import tqdm

from recsys.data.split import LeaveOneOutSplit, Phase

DEFAULT_KS: tuple[int, ...] = (10, 20, 50)
PROTOCOL = (
    "leave-one-out (last item test, second-to-last validation); full ranking over all items; "
    "user's history excluded (-inf); pessimistic ties; averaged over users with >= 3 interactions"
)


def target_ranks(scores: np.ndarray, targets: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
    """0-based rank of each target among all items, history items excluded, ties pessimistic.

    ``scores`` is [B, num_items] (modified in place: history set to -inf).
    """
    scores = np.asarray(scores, dtype=np.float32)
    rows = np.arange(len(targets))
    for row, history in enumerate(histories):
        scores[row, history] = -np.inf
    # Read after the mask: a target inside its own history is excluded with it and never hits.
    target_scores = scores[rows, targets].copy()
    # Items >= target, minus the target itself; NaN targets count as ranked last.
    at_least = (scores >= target_scores[:, None]).sum(axis=1) - 1
    return np.where(np.isfinite(target_scores), at_least, scores.shape[1]).astype(np.float64)


def ranks_from_lists(ranked_lists: Sequence[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """0-based position of each target in its ranked list; +inf when absent."""
    ranks = np.full(len(targets), np.inf)
    for row, (ranked, target) in enumerate(zip(ranked_lists, targets, strict=True)):
        hits = np.flatnonzero(np.asarray(ranked) == target)
        if hits.size:
            ranks[row] = float(hits[0])
    return ranks


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@K and NDCG@K for each K, plus MRR, averaged over all ranks given."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no users to evaluate")
    metrics: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        metrics[f"HR@{k}"] = float(hit.mean())
        metrics[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(np.minimum(ranks, k) + 2.0), 0.0).mean())
    metrics["MRR"] = float(np.where(np.isfinite(ranks), 1.0 / (ranks + 1.0), 0.0).mean())
    metrics["users"] = int(ranks.size)
    return metrics


def evaluate_scorer(
    score_users: Callable[[np.ndarray, Phase], np.ndarray],
    split: LeaveOneOutSplit,
    phase: Phase = "test",
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 512,
    users: np.ndarray | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Full-ranking metrics of a scorer returning [len(users), num_items] scores for a batch."""
    users = split.eval_users if users is None else users
    ranks = []
    batches = range(0, len(users), batch_size)
    for start in tqdm(batches, desc=f"eval {phase}", disable=not progress, leave=False):
        batch = users[start : start + batch_size]
        scores = score_users(batch, phase)
        histories = [split.history(int(u), phase) for u in batch]
        ranks.append(target_ranks(scores, split.targets(batch, phase), histories))
    return metrics_from_ranks(np.concatenate(ranks), ks)


def evaluate_lists(
    recommend_users: Callable[[np.ndarray, Phase], Sequence[np.ndarray]],
    split: LeaveOneOutSplit,
    phase: Phase = "test",
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 512,
    users: np.ndarray | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Metrics of a stage that returns ranked item lists (history already excluded by the stage)."""
    users = split.eval_users if users is None else users
    ranks = []
    batches = range(0, len(users), batch_size)
    for start in tqdm(batches, desc=f"eval {phase}", disable=not progress, leave=False):
        batch = users[start : start + batch_size]
        ranks.append(ranks_from_lists(recommend_users(batch, phase), split.targets(batch, phase)))
    return metrics_from_ranks(np.concatenate(ranks), ks)
