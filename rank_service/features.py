"""Feature building shared by training and serving (numpy only, no torch).

Training and the runtime both turn a request into model inputs through these functions, so the
ranker sees in serving exactly the features it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.data.dataset import EventType
from recsys.jit import kernel
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


def candidate_features(
    recall_scores: np.ndarray, source_scores: np.ndarray, source_mask: np.ndarray
) -> np.ndarray:
    """Per-candidate numeric features [n, NUM_CANDIDATE_FEATURES] (float32) of one request.

    Depends only on the request's own candidates (ranks and z-scores within the request), never
    on their order in the request nor on padding. A non-finite feature (from an infinite or NaN
    score) is 0.
    """
    recall_scores = np.asarray(recall_scores, dtype=np.float32).reshape(-1)
    n = recall_scores.shape[0]
    present = np.asarray(source_mask, dtype=bool).reshape(n, len(SOURCES))
    given = np.asarray(source_scores, dtype=np.float32).reshape(n, len(SOURCES))
    return _candidate_features(recall_scores, given, present)


@kernel("f4[:, :](f4[:], f4[:, :], b1[:, :])")
def _candidate_features(recall_scores: np.ndarray, scores: np.ndarray, present: np.ndarray) -> np.ndarray:
    """:func:`candidate_features`, one source (column) at a time, in float32 throughout."""
    n, sources = present.shape
    width = PER_SOURCE_FEATURES * sources + 2
    features = np.zeros((n, width), np.float32)
    one = np.float32(1.0)
    keys = np.empty(n, np.float32)
    for source in range(sources):
        count = 0
        total = np.float32(0.0)
        for row in range(n):
            if present[row, source]:
                count += 1
                total += scores[row, source]
        safe_count = np.float32(max(count, 1))
        mean = total / safe_count
        squares = np.float32(0.0)
        for row in range(n):
            if present[row, source]:
                centred = scores[row, source] - mean
                squares += centred * centred
        spread = np.float32(np.sqrt(squares / safe_count))
        usable = count > 1 and spread > 0
        # Rank within the source (0 = best), ties broken by position for determinism.
        for row in range(n):
            keys[row] = -scores[row, source] if present[row, source] else np.inf
        order = np.argsort(keys, kind="mergesort")
        base = source * PER_SOURCE_FEATURES
        for rank in range(n):
            row = order[rank]
            if not present[row, source]:
                continue
            score = scores[row, source]
            features[row, base] = one
            if usable:
                features[row, base + 1] = (score - mean) / spread
            features[row, base + 2] = one / (one + np.float32(rank))
            features[row, base + 3] = np.sign(score) * np.log1p(np.abs(score))
            features[row, base + 4] = -np.log1p(np.float32(rank))
    for row in range(n):
        score = recall_scores[row]
        features[row, width - 2] = np.sign(score) * np.log1p(np.abs(score))
        produced = 0
        for source in range(sources):
            produced += present[row, source]
        features[row, width - 1] = produced / sources
        for column in range(width):
            if not np.isfinite(features[row, column]):
                features[row, column] = 0.0
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
