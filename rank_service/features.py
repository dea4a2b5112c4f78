"""Feature building shared by training and serving (numpy only, no torch).

Training and the runtime both turn a request into model inputs through these functions, so the
ranker sees in serving exactly the features it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.data.dataset import EventType
from recsys.sources import RECALL_SOURCES

# Recall sources, in the column order of ``source_scores`` / ``source_mask`` (same as recall's).
SOURCES: tuple[str, ...] = RECALL_SOURCES
NUM_EVENT_TYPES = len(EventType)
# Per source: present, score z-scored within the request, reciprocal rank, signed log score,
# negative log rank (0 = the source's best, lets a linear term reproduce the source's order deep
# into the list); then the recall score (signed log) and the fraction of sources that produced
# the candidate. Absent sources are all zeros.
PER_SOURCE_FEATURES = 5
NUM_CANDIDATE_FEATURES = PER_SOURCE_FEATURES * len(SOURCES) + 2
# Score given to candidates the bundle does not know (and to nothing else): far below any
# score the model produces, finite so that it survives JSON and sorting.
UNKNOWN_CANDIDATE_SCORE = np.float32(-1.0e9)


def signed_log(values: np.ndarray) -> np.ndarray:
    """sign(x) * log1p(|x|): compresses scores whose scale differs by source."""
    return np.sign(values) * np.log1p(np.abs(values))


def candidate_features(
    recall_scores: np.ndarray, source_scores: np.ndarray, source_mask: np.ndarray
) -> np.ndarray:
    """Per-candidate numeric features [n, NUM_CANDIDATE_FEATURES] (float32) of one request.

    Depends only on the request's own candidates (ranks and z-scores within the request), never
    on their order in the request nor on padding. Vectorised over sources (no per-source loop).
    """
    recall_scores = np.asarray(recall_scores, dtype=np.float32).reshape(-1)
    n = recall_scores.shape[0]
    sources = len(SOURCES)
    present = np.asarray(source_mask, dtype=bool).reshape(n, sources)
    given = np.asarray(source_scores, dtype=np.float32).reshape(n, sources)
    scores = np.where(present, given, np.float32(0.0))
    counts = np.count_nonzero(present, axis=0)
    safe_counts = np.maximum(counts, 1).astype(np.float32)
    mean = scores.sum(axis=0, dtype=np.float32) / safe_counts
    centred = np.where(present, scores - mean, np.float32(0.0))
    spread = np.sqrt((centred * centred).sum(axis=0, dtype=np.float32) / safe_counts)
    usable = (counts > 1) & (spread > 0)
    # Written in place: the per-source block is a view of the output's first columns.
    features = np.empty((n, NUM_CANDIDATE_FEATURES), dtype=np.float32)
    per_source = features[:, : sources * PER_SOURCE_FEATURES].reshape(n, sources, PER_SOURCE_FEATURES)
    per_source[:, :, 0] = present
    # An absent entry's centred score is 0, so is its z-score: only the source's spread decides.
    zscores = centred / np.where(usable, spread, np.float32(1.0))
    per_source[:, :, 1] = np.where(usable, zscores, np.float32(0.0))
    # Rank within each source (0 = best), ties broken by position for determinism.
    order = np.argsort(np.where(present, -scores, np.inf), axis=0, kind="stable")
    ranks = np.empty((n, sources), dtype=np.float32)
    ranks[order, np.arange(sources)] = np.arange(n, dtype=np.float32)[:, None]
    per_source[:, :, 2] = np.where(present, 1.0 / (1.0 + ranks), np.float32(0.0))
    per_source[:, :, 3] = signed_log(scores)  # 0 where absent
    per_source[:, :, 4] = np.where(present, -np.log1p(ranks), np.float32(0.0))
    features[:, -2] = signed_log(recall_scores)
    features[:, -1] = np.count_nonzero(present, axis=1) / np.float32(sources)
    if not np.isfinite(features).all():  # an infinite or NaN score; rare, so checked first
        np.nan_to_num(features, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return features


def history_inputs(
    history: np.ndarray, event_types: np.ndarray | None, max_history: int
) -> tuple[np.ndarray, np.ndarray]:
    """Model ids (dense + 1) and event types of the most recent ``max_history`` known items."""
    history = np.asarray(history, dtype=np.int64).reshape(-1)
    if event_types is None or len(event_types) == 0:
        events = np.full(history.shape, int(EventType.VIEW), dtype=np.int64)
    else:
        events = np.asarray(event_types, dtype=np.int64).reshape(-1)
        if events.shape != history.shape:
            raise ValueError(f"event_types has {events.shape[0]} entries for {history.shape[0]} items")
        events = np.where(events == int(EventType.UNSPECIFIED), int(EventType.VIEW), events)
        events = np.clip(events, 0, NUM_EVENT_TYPES - 1)
    known = history >= 0
    history, events = history[known], events[known]
    return history[-max_history:] + 1, events[-max_history:]


@dataclass
class PackedBatch:
    """Padded model inputs for a batch of requests (the ONNX graph's inputs)."""

    history: np.ndarray  # [B, L] int64, dense + 1, 0 = padding (right-padded)
    history_events: np.ndarray  # [B, L] int64
    scenario: np.ndarray  # [B] int64
    candidates: np.ndarray  # [B, N] int64, dense + 1, 0 = padding or unknown
    candidate_features: np.ndarray  # [B, N, F] float32
    candidate_counts: np.ndarray  # [B] int64: real candidates per request
    history_lengths: np.ndarray  # [B] int64

    def feeds(self) -> dict[str, np.ndarray]:
        return {
            "history": self.history,
            "history_events": self.history_events,
            "scenario": self.scenario,
            "candidates": self.candidates,
            "candidate_features": self.candidate_features,
        }


def pack_batch(
    histories: Sequence[tuple[np.ndarray, np.ndarray]],
    scenarios: Sequence[int],
    candidates: Sequence[np.ndarray],
    features: Sequence[np.ndarray],
) -> PackedBatch:
    """Right-pad per-request arrays into one batch; the history is at least one column wide.

    ``histories`` holds (model ids, events) from :func:`history_inputs`; ``candidates`` dense
    ids with -1 for unknown ones (fed to the graph as padding and scored low afterwards).
    """
    batch = len(histories)
    history_lengths = np.array([len(h) for h, _ in histories], dtype=np.int64)
    candidate_counts = np.array([len(c) for c in candidates], dtype=np.int64)
    width = max(1, int(history_lengths.max(initial=0)))
    count = max(1, int(candidate_counts.max(initial=0)))
    history = np.zeros((batch, width), dtype=np.int64)
    history_events = np.zeros((batch, width), dtype=np.int64)
    candidate_ids = np.zeros((batch, count), dtype=np.int64)
    candidate_features_ = np.zeros((batch, count, NUM_CANDIDATE_FEATURES), dtype=np.float32)
    for row, ((items, events), dense, feats) in enumerate(zip(histories, candidates, features, strict=True)):
        history[row, : len(items)] = items
        history_events[row, : len(events)] = events
        dense = np.asarray(dense, dtype=np.int64)
        candidate_ids[row, : len(dense)] = np.where(dense >= 0, dense + 1, 0)
        candidate_features_[row, : len(dense)] = feats
    return PackedBatch(
        history=history,
        history_events=history_events,
        scenario=np.asarray(scenarios, dtype=np.int64).reshape(batch),
        candidates=candidate_ids,
        candidate_features=candidate_features_,
        candidate_counts=candidate_counts,
        history_lengths=history_lengths,
    )
