"""Re-rank rules applied in the gateway after ranking: business filters, diversity, ads revenue.

Candidates stay columnar (:class:`Candidates`: numpy arrays of catalog indices and scores) from
recall's answer to the response; each rule takes them best first and returns a new selection or
order, never reordering what it does not have to. Item attributes (category, brand, bid) come
from the gateway's :class:`~gateway.catalog.Catalog`, not from the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from gateway.catalog import Catalog
from recsys.serving.wire import FLAGS, INDEX, pack
from recsys.sources import RECALL_SOURCES
from recsys.v1 import common_pb2

DAY_MS = 86_400_000
ATTENDED_TOP = 3


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


@dataclass(frozen=True)
class RerankInputs:
    """What the rules may read besides the candidates."""

    catalog: Catalog
    history: History = field(default_factory=History)
    # Catalog indices of context.item_ids.
    context_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    now_ms: int = 0


def exclude_items(candidates: Candidates, excluded: np.ndarray) -> Candidates:
    """Drop the given catalog indices."""
    if not len(excluded) or not len(candidates):
        return candidates
    return candidates.take(np.flatnonzero(~np.isin(candidates.items, excluded)))


def purchased_within(history: History, now_ms: int, days: float) -> np.ndarray:
    """Catalog indices purchased in the last ``days`` days; a purchase without a timestamp counts
    as recent."""
    since_ms = now_ms - days * DAY_MS
    timestamps = history.timestamps_ms
    recent = (history.types == common_pb2.PURCHASE) & ((timestamps <= 0) | (timestamps >= since_ms))
    indices = history.indices[recent]
    return indices[indices >= 0]


def diversify(
    candidates: Candidates,
    catalog: Catalog,
    top_n: int,
    max_per_category: int | None,
    max_per_brand: int | None,
) -> Candidates:
    """Greedy caps: fill the top ``top_n`` in order, deferring items whose category or brand is
    already at its cap; deferred items follow, in their original order. Items without a category
    (or brand) are not capped on it."""
    categories = catalog.item_category[candidates.items].tolist()
    brands = catalog.item_brand[candidates.items].tolist()
    no_cap = len(candidates) + 1
    category_cap = no_cap if max_per_category is None else max_per_category
    brand_cap = no_cap if max_per_brand is None else max_per_brand
    top: list[int] = []
    deferred: list[int] = []
    per_category: dict[int, int] = {}
    per_brand: dict[int, int] = {}
    position = 0
    for position, (category, brand) in enumerate(zip(categories, brands, strict=True)):
        if len(top) >= top_n:
            break
        if (category >= 0 and per_category.get(category, 0) >= category_cap) or (
            brand >= 0 and per_brand.get(brand, 0) >= brand_cap
        ):
            deferred.append(position)
            continue
        top.append(position)
        per_category[category] = per_category.get(category, 0) + 1
        per_brand[brand] = per_brand.get(brand, 0) + 1
    else:
        position = len(candidates)
    order = np.asarray(top + deferred + list(range(position, len(candidates))), dtype=np.int64)
    return candidates.take(order)


def order_by_revenue(candidates: Candidates, catalog: Catalog, floor: float) -> Candidates:
    """Expected revenue = P(choice) x bid, P from a softmax over the list's scores (the ranker is
    trained with a listwise softmax). Items bidding below ``floor`` (or not at all) are dropped;
    the score becomes the expected revenue."""
    if not len(candidates):
        return candidates
    scores = (candidates.rank_scores if candidates.rank_scores is not None else candidates.scores).astype(
        np.float64
    )
    weights = np.exp(scores - scores.max())
    choice = weights / weights.sum()
    bids = catalog.item_bid[candidates.items].astype(np.float64)
    kept = np.flatnonzero((bids > 0) & (bids >= floor))
    revenue = choice[kept] * bids[kept]
    order = kept[np.argsort(-revenue, kind="stable")]
    ranked = candidates.take(order)
    return ranked.with_scores((choice[order] * bids[order]).astype(np.float32))


# The configured rules: each declares what it needs and applies itself.


@dataclass(frozen=True)
class DiversityRule:
    """At most ``max_per_category``/``max_per_brand`` items of one category/brand in the top ``top_n``."""

    top_n: int
    max_per_category: int | None = None
    max_per_brand: int | None = None

    name = "diversity"
    needs = frozenset({"candidates", "attributes"})

    def apply(self, candidates: Candidates, inputs: RerankInputs) -> Candidates:
        return diversify(candidates, inputs.catalog, self.top_n, self.max_per_category, self.max_per_brand)


@dataclass(frozen=True)
class DropPurchasedRule:
    """Drop items the user purchased within the last ``days`` days."""

    days: float

    name = "drop_purchased"
    needs = frozenset({"candidates", "history"})

    def apply(self, candidates: Candidates, inputs: RerankInputs) -> Candidates:
        return exclude_items(candidates, purchased_within(inputs.history, inputs.now_ms, self.days))


@dataclass(frozen=True)
class ExcludeContextRule:
    """Drop the context items (the viewed item, the cart items)."""

    name = "exclude_context"
    needs = frozenset({"candidates"})

    def apply(self, candidates: Candidates, inputs: RerankInputs) -> Candidates:
        return exclude_items(candidates, inputs.context_items)


@dataclass(frozen=True)
class RevenueRule:
    """Order by expected revenue: P(choice) from the rank scores x bid; bids below ``floor`` dropped."""

    floor: float = 0.0

    name = "revenue"
    needs = frozenset({"candidates", "rank_scores", "bids"})

    def apply(self, candidates: Candidates, inputs: RerankInputs) -> Candidates:
        return order_by_revenue(candidates, inputs.catalog, self.floor)


RerankRule = DiversityRule | DropPurchasedRule | ExcludeContextRule | RevenueRule


def apply_rules(rules: Sequence[RerankRule], candidates: Candidates, inputs: RerankInputs) -> Candidates:
    """Apply the rules in order."""
    for rule in rules:
        candidates = rule.apply(candidates, inputs)
    return candidates
