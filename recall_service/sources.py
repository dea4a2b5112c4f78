"""Non-neural recall sources: co-visitation neighbours and popularity tables (numpy only).

Both are computed at export from the training sequences and stored in the bundle as ``.npy``
arrays; serving loads them and answers batched queries without any model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from recsys.jit import hash_slot, hash_table, kernel


@dataclass
class CovisitTable:
    """Top-M co-visitation neighbours per item in CSR form (row ``a`` = neighbours of item ``a``).

    ``neighbours[indptr[a]:indptr[a + 1]]`` are dense item ids, best first, with ``scores``.
    """

    indptr: np.ndarray  # int64 [num_items + 1]
    neighbours: np.ndarray  # int64 [nnz]
    scores: np.ndarray  # float32 [nnz]

    def __post_init__(self) -> None:  # the dtypes the look-up kernel is compiled for
        self.indptr = np.asarray(self.indptr, np.int64)
        self.neighbours = np.asarray(self.neighbours, np.int64)
        self.scores = np.asarray(self.scores, np.float32)

    @property
    def num_items(self) -> int:
        return len(self.indptr) - 1

    def row(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.indptr[item], self.indptr[item + 1]
        return self.neighbours[start:end], self.scores[start:end]

    def save(self, folder: Path) -> list[str]:
        names = {
            "covisit_indptr.npy": self.indptr,
            "covisit_neighbours.npy": self.neighbours,
            "covisit_scores.npy": self.scores,
        }
        for name, array in names.items():
            np.save(folder / name, array)
        return list(names)

    @classmethod
    def load(cls, folder: Path) -> CovisitTable:
        return cls(
            indptr=np.load(folder / "covisit_indptr.npy"),
            neighbours=np.load(folder / "covisit_neighbours.npy"),
            scores=np.load(folder / "covisit_scores.npy"),
        )


def build_covisit_table(
    sequences: Sequence[np.ndarray],
    num_items: int,
    window: int = 3,
    backward_weight: float = 0.5,
    popularity_exponent: float = 0.25,
    top_m: int = 200,
) -> CovisitTable:
    """Co-occurrence of items within ``window`` steps of each other in the same sequence.

    A pair ``a`` then ``b`` at distance ``d`` adds ``1/d`` to ``a -> b`` and ``backward_weight/d``
    to ``b -> a`` (what follows an item predicts better than what precedes it). Each weight is then
    divided by ``count(b) ** popularity_exponent`` so that bestsellers do not become everyone's
    neighbour, and only the ``top_m`` best neighbours per item are kept.
    """
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = (
        np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])
        if len(sequences)
        else np.zeros(0, np.int64)
    )
    owner = np.repeat(np.arange(len(sequences)), lengths)
    counts = np.bincount(flat, minlength=num_items).astype(np.float64)
    keys, weights = [], []
    for distance in range(1, window + 1):
        same_sequence = owner[:-distance] == owner[distance:]
        before, after = flat[:-distance][same_sequence], flat[distance:][same_sequence]
        different = before != after
        before, after = before[different], after[different]
        keys += [before * num_items + after, after * num_items + before]
        weights += [np.full(before.size, 1.0 / distance), np.full(before.size, backward_weight / distance)]
    if not keys or sum(k.size for k in keys) == 0:
        return CovisitTable(np.zeros(num_items + 1, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    pair_keys, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    pair_weights = np.bincount(inverse, weights=np.concatenate(weights))
    source, target = pair_keys // num_items, pair_keys % num_items
    pair_scores = pair_weights / np.maximum(counts[target], 1.0) ** popularity_exponent
    # Best first within each source row; ties by target popularity, then id (deterministic).
    order = np.lexsort((target, -counts[target], -pair_scores, source))
    source, target, pair_scores = source[order], target[order], pair_scores[order]
    row_start = np.searchsorted(source, np.arange(num_items))
    rank_in_row = np.arange(source.size) - row_start[source]
    keep = rank_in_row < top_m
    source, target, pair_scores = source[keep], target[keep], pair_scores[keep]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(source, minlength=num_items))]).astype(np.int64)
    return CovisitTable(indptr, target.astype(np.int64), pair_scores.astype(np.float32))


def covisit_candidates(
    table: CovisitTable,
    anchors: np.ndarray,
    anchor_weights: np.ndarray,
    item_counts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Items scored by the weighted sum of their co-visitation with ``anchors``, best first.

    Ties are broken by popularity, then by id. Returns (items int64, scores float32).
    """
    unique_items, sums = _covisit_sums(
        table.indptr,
        table.neighbours,
        table.scores,
        np.asarray(anchors, np.int64).reshape(-1),
        np.asarray(anchor_weights, np.float64).reshape(-1),
    )
    # Ordered by the float32 score it reports: recall shards' lists merge by that score exactly.
    summed = sums.astype(np.float32)
    order = np.lexsort((unique_items, -item_counts[unique_items], -summed))
    return unique_items[order], summed[order]


@kernel("Tuple((i8[:], f8[:]))(i8[:], i8[:], f4[:], i8[:], f8[:])")
def _covisit_sums(
    indptr: np.ndarray, neighbours: np.ndarray, scores: np.ndarray, anchors: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Every neighbour of the anchors once (first-seen order) with the sum, in float64 and in the
    anchors' order, of its scores times the anchor's weight; anchors outside the table add none."""
    num_items = len(indptr) - 1
    total = 0
    for anchor in anchors:
        if 0 <= anchor < num_items:
            total += indptr[anchor + 1] - indptr[anchor]
    keys, slots, shift = hash_table(total)
    items = np.empty(total, np.int64)
    sums = np.zeros(total, np.float64)
    count = 0
    for position in range(len(anchors)):
        anchor = anchors[position]
        if not 0 <= anchor < num_items:
            continue
        for entry in range(indptr[anchor], indptr[anchor + 1]):
            item = neighbours[entry]
            slot = hash_slot(keys, slots, shift, item)
            if slots[slot] < 0:
                keys[slot] = item
                slots[slot] = count
                items[count] = item
                count += 1
            sums[slots[slot]] += np.float64(scores[entry]) * weights[position]
    return items[:count], sums[:count]


@dataclass
class PopularityTable:
    """Items by training interaction count: globally, per category and among sponsored items."""

    counts: np.ndarray  # int64 [num_items]
    global_order: np.ndarray  # int64 item ids, most popular first
    category_indptr: np.ndarray  # int64 [num_categories + 1] into category_items
    category_items: np.ndarray  # int64 item ids grouped by category, most popular first

    @classmethod
    def build(cls, counts: np.ndarray, item_category: np.ndarray, num_categories: int) -> PopularityTable:
        counts = np.asarray(counts, dtype=np.int64)
        ids = np.arange(len(counts))
        global_order = np.lexsort((ids, -counts))
        known = item_category >= 0
        order = np.lexsort((ids[known], -counts[known], item_category[known]))
        category_items = ids[known][order]
        per_category = np.bincount(item_category[known], minlength=num_categories)[:num_categories]
        indptr = np.concatenate([[0], np.cumsum(per_category)]).astype(np.int64)
        return cls(counts, global_order.astype(np.int64), indptr, category_items.astype(np.int64))

    def ranked(self, category: int = -1) -> np.ndarray:
        """Item ids by popularity, restricted to ``category`` when it is >= 0."""
        if category < 0:
            return self.global_order
        return self.category_items[self.category_indptr[category] : self.category_indptr[category + 1]]

    @cached_property
    def ranks(self) -> np.ndarray:
        """int32 [num_items]: each item's position in the global order (count, then id)."""
        ranks = np.empty(len(self.global_order), dtype=np.int32)
        ranks[self.global_order] = np.arange(len(self.global_order), dtype=np.int32)
        return ranks

    @cached_property
    def top_count(self) -> int:
        """The most popular item's count (at least 1): the scale of :meth:`scores`."""
        return max(int(self.counts.max(initial=0)), 1)

    def scores(self, items: np.ndarray) -> np.ndarray:
        """Popularity score in [0, 1]: count relative to the most popular item."""
        return (self.counts[items] / self.top_count).astype(np.float32)

    def save(self, folder: Path) -> list[str]:
        names = {
            "popularity_counts.npy": self.counts,
            "popularity_global.npy": self.global_order,
            "popularity_category_indptr.npy": self.category_indptr,
            "popularity_category_items.npy": self.category_items,
        }
        for name, array in names.items():
            np.save(folder / name, array)
        return list(names)

    @classmethod
    def load(cls, folder: Path) -> PopularityTable:
        return cls(
            counts=np.load(folder / "popularity_counts.npy"),
            global_order=np.load(folder / "popularity_global.npy"),
            category_indptr=np.load(folder / "popularity_category_indptr.npy"),
            category_items=np.load(folder / "popularity_category_items.npy"),
        )


def interaction_tables(
    sequences: Sequence[np.ndarray],
    num_items: int,
    item_category: np.ndarray,
    num_categories: int,
    covisit: Mapping[str, float],
) -> tuple[CovisitTable, PopularityTable]:
    """The co-visitation and popularity tables of a recall bundle counted over ``sequences``,
    with ``covisit`` settings as the bundle manifest records them (window, backward_weight,
    popularity_exponent, neighbours)."""
    table = build_covisit_table(
        sequences,
        num_items,
        window=int(covisit["window"]),
        backward_weight=float(covisit["backward_weight"]),
        popularity_exponent=float(covisit["popularity_exponent"]),
        top_m=int(covisit["neighbours"]),
    )
    counts = (
        np.bincount(np.concatenate(sequences), minlength=num_items)
        if len(sequences)
        else np.zeros(num_items, np.int64)
    )
    return table, PopularityTable.build(counts, np.asarray(item_category, np.int64), num_categories)
