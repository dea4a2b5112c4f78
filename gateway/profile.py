"""A user's readable profile (``Gateway.GetUserProfile``): the categories and brands of their
history, weighted by event type and recency, plus the attribute clusters nearest their embedding
(asked of the recall service, whose user tower and item embeddings make them).

History weights, defined here once:

- each event weighs ``EVENT_TYPE_WEIGHTS[type]`` (view 1, click 2, add_to_cart 4, purchase 8:
  each step of intent counts twice the one before; UNSPECIFIED counts as a view)
  times ``0.5 ** (age / HALF_LIFE_MS)`` (a 30-day half-life: a purchase 90 days old weighs as
  much as a view today); an event without a timestamp (0) counts as made now; a timestamp ahead
  of the gateway's clock, as now;
- an entry's (a category's, a brand's) weight is the sum of its events' weights divided by the sum
  over every event whose item has an entry of that kind, so all entries of a kind sum to 1;
- items the catalog does not know are skipped (and counted); items without a category (brand)
  count for the brands (categories) only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.scenario.candidates import History
from recsys.scenario.catalog import Catalog
from recsys.serving.validation import InvalidArgument
from recsys.serving.wire import INDEX, SCORE, unpack
from recsys.v1 import common_pb2, recall_pb2

DAY_MS = 24 * 3600 * 1000
HALF_LIFE_MS = 30 * DAY_MS
EVENT_TYPE_WEIGHTS = {
    common_pb2.EVENT_TYPE_UNSPECIFIED: 1.0,  # treated as a view, as everywhere else
    common_pb2.VIEW: 1.0,
    common_pb2.CLICK: 2.0,
    common_pb2.ADD_TO_CART: 4.0,
    common_pb2.PURCHASE: 8.0,
}
DEFAULT_TOP_N = 10
MAX_TOP_N = 100


@dataclass(frozen=True)
class ProfileEntry:
    """One category or brand of a history: its weight (share of its kind), how many events and
    the newest of them (0 when no timestamp is known)."""

    name: str
    weight: float
    events: int
    last_seen_ms: int


@dataclass(frozen=True)
class HistoryProfile:
    """The history part of a profile."""

    categories: list[ProfileEntry]
    brands: list[ProfileEntry]
    history_length: int  # events read
    unknown_items: int  # of them, not in the catalog (skipped)


@dataclass(frozen=True)
class NearestAttribute:
    """An attribute cluster near the user embedding."""

    kind: str  # "category" or "brand"
    name: str
    similarity: float


def event_weights(types: np.ndarray, timestamps_ms: np.ndarray, now_ms: int) -> np.ndarray:
    """Each event's weight relative to the heaviest one (1.0): shares are all that is reported,
    and working in log2 space keeps very old events from underflowing to zero all together."""
    type_weights = np.array(
        [EVENT_TYPE_WEIGHTS.get(int(event_type), 1.0) for event_type in types.tolist()], dtype=np.float64
    )
    timestamps = np.asarray(timestamps_ms, dtype=np.int64)
    ages_ms = np.where(timestamps > 0, np.maximum(now_ms - timestamps, 0), 0).astype(np.float64)
    log_weights = np.log2(type_weights) - ages_ms / HALF_LIFE_MS
    if not len(log_weights):
        return log_weights
    return np.exp2(log_weights - log_weights.max())


def _entries(
    labels: np.ndarray, weights: np.ndarray, timestamps_ms: np.ndarray, names: Sequence[str], top_n: int
) -> list[ProfileEntry]:
    """The ``top_n`` heaviest entries of ``labels`` (indices into ``names``; -1 = none)."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = (labels >= 0) & (labels < len(names))
    labels, weights, timestamps_ms = labels[keep], weights[keep], timestamps_ms[keep]
    total = float(weights.sum())
    if not len(labels) or total <= 0:
        return []
    sums = np.bincount(labels, weights=weights, minlength=len(names))
    counts = np.bincount(labels, minlength=len(names))
    newest = np.zeros(len(names), dtype=np.int64)
    np.maximum.at(newest, labels, np.asarray(timestamps_ms, dtype=np.int64))
    present = np.flatnonzero(counts)
    # heaviest first; ties: more events, then the catalog's order
    order = present[np.lexsort((present, -counts[present], -sums[present]))][:top_n]
    return [
        ProfileEntry(names[label], float(sums[label] / total), int(counts[label]), int(newest[label]))
        for label in order.tolist()
    ]


def history_profile(history: History, catalog: Catalog, now_ms: int, top_n: int) -> HistoryProfile:
    """The categories and brands of ``history`` (catalog indices resolved), weighted as the module
    docstring says, ``top_n`` of each."""
    known = history.known
    items = history.indices[known]
    weights = event_weights(history.types[known], history.timestamps_ms[known], now_ms)
    timestamps = np.asarray(history.timestamps_ms[known], dtype=np.int64)
    return HistoryProfile(
        categories=_entries(catalog.item_category[items], weights, timestamps, catalog.category_names, top_n),
        brands=_entries(catalog.item_brand[items], weights, timestamps, catalog.brand_names, top_n),
        history_length=len(history),
        unknown_items=len(history) - len(known),
    )


def nearest_attributes(response: recall_pb2.UserProfileResponse, catalog: Catalog) -> list[NearestAttribute]:
    """Recall's packed answer as named clusters (categories first, then brands); ValueError when
    it is malformed or names an attribute the catalog does not have."""
    try:
        nearest = []
        for kind, indices, similarities, names in (
            ("category", response.categories, response.category_similarities, catalog.category_names),
            ("brand", response.brands, response.brand_similarities, catalog.brand_names),
        ):
            values = unpack(indices, INDEX, kind)
            scores = unpack(similarities, SCORE, f"{kind}_similarities", len(values))
            for value, score in zip(values.tolist(), scores.tolist(), strict=True):
                if not 0 <= value < len(names):
                    raise ValueError(f"recall named {kind} {value}; the catalog has {len(names)}")
                nearest.append(NearestAttribute(kind, names[value], score))
    except InvalidArgument as error:
        raise ValueError(f"malformed UserProfile answer: {error}") from None
    return nearest
