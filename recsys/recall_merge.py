"""Recall's merge of its sources into ``k`` candidates: one implementation for the recall service
(its own source lists) and the gateway's fan-out over recall shards (the shards' lists combined).

A source list is ordered by its score, best first, ties by the global popularity order (the
order the sources themselves produce). A shard owns the item range :func:`shard_range` and answers
each source's list over its range only, fetched exactly as the unsharded service would fetch it
(:func:`fetch_size`), so the best ``fetch_size`` of the shards' lists together ARE the unsharded
list, and merging them gives the unsharded answer (:func:`merge_shards`).

Both wire forms of an answer live here too: the merged candidates (``RecallResponse.items`` ...)
and the unmerged lists a shard sends a fan-out (``RecallResponse.source_lists``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from recsys.jit import hash_slot, hash_table, kernel
from recsys.serving.wire import FLAGS, INDEX, SCORE, mask_to_flags, pack, unpack
from recsys.sources import RECALL_SOURCES as SOURCES
from recsys.sources import SOURCE_INDEX
from recsys.v1 import recall_pb2

# Each source fetches its own quota plus this share of it (at least FETCH_SLACK_MIN items), so
# that items another source already took do not leave it short; exclusions are fetched on top.
FETCH_SLACK = 0.5
FETCH_SLACK_MIN = 20
POPULAR = SOURCE_INDEX["popular"]
_EMPTY_IDS = np.zeros(0, dtype=np.int64)
_NO_SCORES = np.zeros(0, dtype=np.float32)


def fetch_size(quota: int, num_items: int | None = None) -> int:
    """How many items a source with ``quota`` fetches: its quota plus slack, capped at the catalog."""
    size = quota + max(FETCH_SLACK_MIN, math.ceil(FETCH_SLACK * quota))
    return size if num_items is None else min(num_items, size)


def shard_range(index: int, count: int, num_items: int) -> tuple[int, int]:
    """The catalog indices ``[start, end)`` shard ``index`` of ``count`` owns."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} outside 0..{count - 1}")
    return index * num_items // count, (index + 1) * num_items // count


@dataclass
class SourceList:
    """One source's candidates, best first. ``ranks`` (each item's position in the global
    popularity order, the tie-break between equal scores) travel with a shard's lists only."""

    items: np.ndarray  # int64 catalog indices
    scores: np.ndarray  # float32
    ranks: np.ndarray | None = None  # int32

    @classmethod
    def empty(cls) -> SourceList:
        return cls(_EMPTY_IDS, np.zeros(0, np.float32), np.zeros(0, np.int32))


@dataclass
class SourceLists:
    """A query's sources before the merge: what a shard answers a fan-out."""

    quotas: dict[str, int]  # resolved: the request's, or the scenario's defaults scaled to k
    k: int
    lists: dict[str, SourceList]
    fill: SourceList | None = None  # popularity order under the filters, without excluded items


@dataclass
class CandidateList:
    """Merged candidates of one query, best first."""

    items: np.ndarray  # int64 dense ids
    scores: np.ndarray  # float32, the primary source's score
    source_ids: np.ndarray  # uint8 primary source per item, an index into SOURCES
    source_scores: np.ndarray  # float32 [n, len(SOURCES)], 0 where a source did not produce it
    source_mask: np.ndarray  # bool [n, len(SOURCES)]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def sources(self) -> list[str]:
        """The primary source's name per item."""
        return [SOURCES[s] for s in self.source_ids.tolist()]


@kernel("Tuple((i8[:], i8[:]))(i8[:], i8[:], f8[:], i8[:], i8)")
def merge_order(
    items: np.ndarray, starts: np.ndarray, paces: np.ndarray, limits: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``items`` (every source's list concatenated, source ``s`` at
    ``starts[s]:starts[s + 1]``) of the merged candidates, and each one's source.

    Merge order: by rank relative to the source's pace ((rank + 1) / pace, so a source with twice
    the quota comes twice as often), ties by source index. Walking that order, an entry is taken
    when its item is new and its source is under ``limits``; an entry past its source's limit
    claims nothing (a later entry of another source may still take the item). Stops at ``k``.
    """
    sources = len(starts) - 1
    cursor = starts[:-1].copy()
    taken = np.zeros(sources, np.int64)
    wanted = max(min(k, len(items)), 0)
    chosen = np.empty(wanted, np.int64)
    chosen_sources = np.empty(wanted, np.int64)
    keys, values, shift = hash_table(len(items))
    count = 0
    while count < wanted:
        best = -1
        best_key = np.inf
        for source in range(sources):
            if cursor[source] < starts[source + 1]:
                key = (cursor[source] - starts[source] + 1.0) / paces[source]
                if best < 0 or key < best_key:
                    best, best_key = source, key
        if best < 0:
            break
        position = cursor[best]
        cursor[best] += 1
        if taken[best] >= limits[best]:  # past its quota for good: the rest claims nothing
            cursor[best] = starts[best + 1]
            continue
        item = items[position]
        slot = hash_slot(keys, values, shift, item)
        if values[slot] >= 0:
            continue
        keys[slot] = item
        values[slot] = position
        taken[best] += 1
        chosen[count] = position
        chosen_sources[count] = best
        count += 1
    return chosen[:count], chosen_sources[:count]


@kernel("Tuple((i8[:], i8[:], f4[:, :], b1[:, :]))(i8[:], i8[:], i8[:], f4[:], i8[:], i8[:], f4[:], i8, i8)")
def candidate_columns(
    merged: np.ndarray,
    merged_sources: np.ndarray,
    items: np.ndarray,
    scores: np.ndarray,
    starts: np.ndarray,
    fill_items: np.ndarray,
    fill_scores: np.ndarray,
    k: int,
    fill_source: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The merged candidates topped up from the fill list (its items not merged, in order, while
    under ``k``), then every candidate's score in every source (an item's first entry in the
    source's list; 0 where absent) and presence mask; a filled candidate the fill source's own
    list lacks gets the fill list's score. Returns (items, source ids, source scores, mask)."""
    num_sources = len(starts) - 1
    keys, values, shift = hash_table(len(merged))
    for row in range(len(merged)):
        slot = hash_slot(keys, values, shift, merged[row])
        keys[slot] = merged[row]
        values[slot] = row
    fresh = np.empty(min(len(fill_items), max(k - len(merged), 0)), np.int64)
    filled = 0
    for position in range(len(fill_items)):
        if filled >= len(fresh):
            break
        if values[hash_slot(keys, values, shift, fill_items[position])] < 0:
            fresh[filled] = position
            filled += 1
    count = len(merged) + filled
    out_items = np.empty(count, np.int64)
    out_sources = np.empty(count, np.int64)
    out_items[: len(merged)] = merged
    out_sources[: len(merged)] = merged_sources
    for row in range(filled):
        out_items[len(merged) + row] = fill_items[fresh[row]]
        out_sources[len(merged) + row] = fill_source
    source_scores = np.zeros((count, num_sources), np.float32)
    source_mask = np.zeros((count, num_sources), np.bool_)
    for source in range(num_sources):
        length = starts[source + 1] - starts[source]
        if length == 0:
            continue
        keys, values, shift = hash_table(length)  # item -> its first position in the list
        for position in range(starts[source], starts[source + 1]):
            slot = hash_slot(keys, values, shift, items[position])
            if values[slot] < 0:
                keys[slot] = items[position]
                values[slot] = position
        for row in range(count):
            position = values[hash_slot(keys, values, shift, out_items[row])]
            if position >= 0:
                source_scores[row, source] = scores[position]
                source_mask[row, source] = True
    for row in range(filled):
        if not source_mask[len(merged) + row, fill_source]:
            source_scores[len(merged) + row, fill_source] = fill_scores[fresh[row]]
            source_mask[len(merged) + row, fill_source] = True
    return out_items, out_sources, source_scores, source_mask


def merge_sources(
    lists: dict[str, SourceList],
    quotas: dict[str, int],
    k: int,
    fill: SourceList | Callable[[], SourceList] | None = None,
) -> CandidateList:
    """Interleave sources by rank relative to their quota, de-duplicate, cap each source at its
    quota, cut at k, then top up from ``fill`` (the popularity order under the same filters,
    without excluded items; a callable is only called when short) while under k
    (:func:`merge_order`, :func:`candidate_columns`)."""
    unknown = set(lists) - set(SOURCES)
    if unknown:
        raise KeyError(f"unknown recall sources {sorted(unknown)}")
    starts = np.zeros(len(SOURCES) + 1, np.int64)
    paces = np.ones(len(SOURCES), np.float64)
    limits = np.zeros(len(SOURCES), np.int64)
    for name, quota in quotas.items():
        limits[SOURCE_INDEX[name]] = quota
    parts = []
    for index, name in enumerate(SOURCES):
        found = lists.get(name)
        length = 0 if found is None else len(found.items)
        starts[index + 1] = starts[index] + length
        if length:
            paces[index] = quotas[name]
            parts.append(found)
    items = np.concatenate([p.items for p in parts]).astype(np.int64, copy=False) if parts else _EMPTY_IDS
    scores = np.concatenate([p.scores for p in parts]).astype(np.float32, copy=False) if parts else _NO_SCORES
    chosen, chosen_sources = merge_order(items, starts, paces, limits, k)
    fill_list = None
    if fill is not None and len(chosen) < k:
        fill_list = fill() if callable(fill) else fill
    fill_items = _EMPTY_IDS if fill_list is None else np.asarray(fill_list.items, np.int64)
    fill_scores = _NO_SCORES if fill_list is None else np.asarray(fill_list.scores, np.float32)
    merged, source_ids, source_scores, source_mask = candidate_columns(
        items[chosen], chosen_sources, items, scores, starts, fill_items, fill_scores, k, POPULAR
    )
    return CandidateList(
        items=merged,
        scores=source_scores[np.arange(len(merged)), source_ids],
        source_ids=source_ids.astype(np.uint8),
        source_scores=source_scores,
        source_mask=source_mask,
    )


def combine_lists(parts: Sequence[SourceList], limit: int) -> SourceList:
    """The best ``limit`` of several shards' lists of one source: by score, ties by popularity
    rank (each part must carry ``ranks``); an item two parts both have is kept once."""
    parts = [p for p in parts if len(p.items)]
    if not parts:
        return SourceList.empty()
    items = np.concatenate([p.items for p in parts]).astype(np.int64)
    scores = np.concatenate([p.scores for p in parts]).astype(np.float32)
    ranks = np.concatenate([p.ranks for p in parts if p.ranks is not None]).astype(np.int32)
    if len(ranks) != len(items):
        raise ValueError("every shard's source list must carry popularity ranks")
    order = np.lexsort((ranks, -scores))
    items, scores, ranks = items[order], scores[order], ranks[order]
    _, first = np.unique(items, return_index=True)  # shards own disjoint ranges; guard anyway
    if len(first) < len(items):
        keep = np.sort(first)
        items, scores, ranks = items[keep], scores[keep], ranks[keep]
    return SourceList(items[:limit], scores[:limit], ranks[:limit])


def merge_shards(parts: Sequence[SourceLists]) -> CandidateList:
    """The candidates the unsharded service would answer, from its shards' source lists (all for
    the same request; a missing shard's items are simply absent)."""
    if not parts:
        raise ValueError("no shard answered")
    quotas, k = parts[0].quotas, parts[0].k
    lists = {
        source: combine_lists([p.lists[source] for p in parts if source in p.lists], fetch_size(quota))
        for source, quota in quotas.items()
        if any(source in p.lists for p in parts)
    }
    fills = [p.fill for p in parts if p.fill is not None]
    fill = combine_lists(fills, k) if fills else None
    return merge_sources(lists, quotas, k, fill)


# ---------------------------------------------------------------------- the two wire forms


def candidates_response(candidates: CandidateList, catalog: str, version: str) -> recall_pb2.RecallResponse:
    """The packed wire form of merged candidates: one array per column, whatever their number."""
    return recall_pb2.RecallResponse(
        model_version=version,
        catalog=catalog,
        items=pack(candidates.items, INDEX),
        scores=pack(candidates.scores, SCORE),
        sources=pack(candidates.source_ids, FLAGS),
        source_names=SOURCES,
        source_scores=pack(candidates.source_scores, SCORE),
        source_flags=mask_to_flags(candidates.source_mask).tobytes(),
    )


def _list_message(source: str, found: SourceList) -> recall_pb2.SourceList:
    assert found.ranks is not None, "a shard's source lists carry popularity ranks"
    return recall_pb2.SourceList(
        source=source,
        items=pack(found.items, INDEX),
        scores=pack(found.scores, SCORE),
        popularity_ranks=pack(found.ranks, INDEX),
    )


def source_lists_response(
    lists: SourceLists, catalog: str, version: str, shard_index: int = 0, shard_count: int = 1
) -> recall_pb2.RecallResponse:
    """The unmerged wire form a shard answers a fan-out with (``RecallRequest.source_lists``)."""
    response = recall_pb2.RecallResponse(
        model_version=version,
        catalog=catalog,
        source_names=SOURCES,
        source_lists=[_list_message(source, found) for source, found in lists.lists.items()],
        quotas=[recall_pb2.SourceQuota(source=s, k=k) for s, k in lists.quotas.items()],
        shard_index=shard_index,
        shard_count=shard_count,
    )
    if lists.fill is not None:
        response.popular_fill.CopyFrom(_list_message("popular", lists.fill))
    return response


def _decode_list(message: recall_pb2.SourceList, field_name: str) -> SourceList:
    items = unpack(message.items, INDEX, f"{field_name}.items")
    count = len(items)
    scores = unpack(message.scores, SCORE, f"{field_name}.scores", count)
    ranks = unpack(message.popularity_ranks, INDEX, f"{field_name}.popularity_ranks", count)
    if not np.isfinite(scores).all():
        raise ValueError(f"{field_name}.scores: must be finite")
    return SourceList(items.astype(np.int64), scores, ranks)


def source_lists_from_response(response: recall_pb2.RecallResponse, k: int) -> SourceLists:
    """A shard's unmerged answer to a request for ``k`` candidates; ValueError when malformed."""
    quotas = {quota.source: quota.k for quota in response.quotas}
    unknown = sorted(set(quotas) - set(SOURCES))
    if unknown or not quotas:
        raise ValueError(f"quotas: unknown sources {unknown}" if unknown else "quotas: none given")
    lists: dict[str, SourceList] = {}
    for position, message in enumerate(response.source_lists):
        if message.source not in quotas:
            raise ValueError(f"source_lists[{position}].source: {message.source!r} has no quota")
        lists[message.source] = _decode_list(message, f"source_lists[{position}]")
    fill = _decode_list(response.popular_fill, "popular_fill") if response.HasField("popular_fill") else None
    return SourceLists(quotas=quotas, k=k, lists=lists, fill=fill)
