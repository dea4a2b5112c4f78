"""The columnar values a scenario's stages pass along: :class:`Candidates` (an ordered list as
parallel numpy arrays of catalog indices and scores) and :class:`History` (the user's behaviour
sequence with catalog indices). Only the items a response returns ever become messages."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from recsys.serving.wire import FLAGS, INDEX, pack
from recsys.sources import RECALL_SOURCES


@dataclass(frozen=True)
class Candidates:
    """An ordered candidate list (best first) as parallel arrays."""

    items: np.ndarray  # int32 catalog indices
    recall_scores: np.ndarray  # float32: the primary recall source's score
    sources: np.ndarray  # uint8 primary source, an index into RECALL_SOURCES
    source_scores: np.ndarray  # float32 [n, len(RECALL_SOURCES)], 0 where absent
    source_flags: np.ndarray  # uint8: bit s = RECALL_SOURCES[s] produced the item
    scores: np.ndarray  # float32: the score the response carries (rank, recall or revenue)
    rank_scores: np.ndarray | None = None  # float32 when ranked
    attended: np.ndarray | None = None  # int32 [n, 3] history positions the ranker attended to

    def __len__(self) -> int:
        return len(self.items)

    def take(self, positions: np.ndarray) -> Candidates:
        """The candidates at ``positions`` (a selection or a new order)."""
        return Candidates(
            items=self.items[positions],
            recall_scores=self.recall_scores[positions],
            sources=self.sources[positions],
            source_scores=self.source_scores[positions],
            source_flags=self.source_flags[positions],
            scores=self.scores[positions],
            rank_scores=None if self.rank_scores is None else self.rank_scores[positions],
            attended=None if self.attended is None else self.attended[positions],
        )

    def head(self, count: int) -> Candidates:
        return self.take(np.arange(min(count, len(self))))

    def with_scores(self, scores: np.ndarray, **changes: np.ndarray | None) -> Candidates:
        return replace(self, scores=np.asarray(scores, dtype=np.float32), **changes)

    @classmethod
    def empty(cls) -> Candidates:
        return cls.from_source(np.zeros(0, np.int32), np.zeros(0, np.float32), "popular")

    @classmethod
    def from_source(cls, items: np.ndarray, scores: np.ndarray, source: str) -> Candidates:
        """Candidates that all come from one source (the gateway's popular fallback)."""
        column = RECALL_SOURCES.index(source)
        count = len(items)
        source_scores = np.zeros((count, len(RECALL_SOURCES)), dtype=np.float32)
        source_scores[:, column] = scores
        return cls(
            items=np.asarray(items, dtype=np.int32),
            recall_scores=np.asarray(scores, dtype=np.float32),
            sources=np.full(count, column, dtype=np.uint8),
            source_scores=source_scores,
            source_flags=np.full(count, 1 << column, dtype=np.uint8),
            scores=np.asarray(scores, dtype=np.float32),
        )


@dataclass(frozen=True)
class History:
    """A user's behaviour sequence, oldest first, with the catalog index of each item."""

    item_ids: tuple[str, ...] = ()
    types: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # EventType per item
    timestamps_ms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # 0 = unknown
    # Catalog index per item, -1 = not in the catalog.
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def known(self) -> np.ndarray:
        """Positions of the items the catalog knows (what the models see)."""
        return np.flatnonzero(self.indices >= 0)

    @cached_property
    def packed(self) -> tuple[bytes, bytes]:
        """The known items and their event types as the internal wire carries them (computed once
        per request, sent to recall and to rank)."""
        known = self.known
        return pack(self.indices[known], INDEX), pack(self.types[known], FLAGS)
