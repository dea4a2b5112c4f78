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


def take_under_quotas(
    items: np.ndarray, source_ids: np.ndarray, quotas: dict[str, int], k: int | None = None
) -> np.ndarray:
    """Positions (in merge order) of the first occurrence of each item, each source capped.

    An entry past its source's quota is skipped without claiming its item, so a later entry
    of another source may still claim it. One pass in merge order; stops at ``k`` taken.
    """
    limit = [0] * len(SOURCES)
    for name, quota in quotas.items():
        limit[SOURCE_INDEX[name]] = quota
    taken = [0] * len(SOURCES)
    seen: set[int] = set()
    chosen: list[int] = []
    wanted = len(items) if k is None else k
    for position, (item, source) in enumerate(zip(items.tolist(), source_ids.tolist(), strict=True)):
        if item in seen or taken[source] >= limit[source]:
            continue
        seen.add(item)
        taken[source] += 1
        chosen.append(position)
        if len(chosen) >= wanted:
            break
    return np.asarray(chosen, dtype=np.int64)


def interleave(lists: dict[str, SourceList], quotas: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Every source's items in merge order, with the index of the source of each: by rank relative
    to the source's quota ((rank + 1) / quota, so a source with twice the quota comes twice as
    often), ties in :data:`SOURCES` order."""
    names = [s for s in SOURCES if s in lists and len(lists[s].items)]
    if not names:
        return _EMPTY_IDS, np.zeros(0, dtype=np.int64)
    items = np.concatenate([lists[s].items for s in names])
    source_ids = np.concatenate([np.full(len(lists[s].items), SOURCE_INDEX[s]) for s in names])
    keys = np.concatenate([(np.arange(len(lists[s].items)) + 1.0) / quotas[s] for s in names])
    order = np.lexsort((source_ids, keys))
    return items[order], source_ids[order]


def merge_sources(
    lists: dict[str, SourceList],
    quotas: dict[str, int],
    k: int,
    fill: SourceList | Callable[[], SourceList] | None = None,
) -> CandidateList:
    """Interleave sources by rank relative to their quota, de-duplicate, cap each source at its
    quota, cut at k, then top up from ``fill`` (the popularity order under the same filters,
    without excluded items; a callable is only called when short) while under k."""
    items, source_ids = interleave(lists, quotas)
    if len(items):
        chosen = take_under_quotas(items, source_ids, quotas, k)
        items, source_ids = items[chosen], source_ids[chosen]
    merged = len(items)
    fill_scores = np.zeros(0, np.float32)
    if fill is not None and merged < k:
        fill_list = fill() if callable(fill) else fill
        fresh = np.flatnonzero(~np.isin(fill_list.items, items))[: k - merged]
        items = np.concatenate([items, fill_list.items[fresh]])
        source_ids = np.concatenate([source_ids, np.full(len(fresh), POPULAR)])
        fill_scores = fill_list.scores[fresh]
    source_scores = np.zeros((len(items), len(SOURCES)), dtype=np.float32)
    source_mask = np.zeros((len(items), len(SOURCES)), dtype=bool)
    for name, found in lists.items():
        column = SOURCE_INDEX[name]
        order = np.argsort(found.items, kind="stable")
        sorted_items = found.items[order]
        positions = np.searchsorted(sorted_items, items)
        positions = np.minimum(positions, max(len(sorted_items) - 1, 0))
        hit = sorted_items[positions] == items if len(sorted_items) else np.zeros(len(items), bool)
        source_scores[hit, column] = found.scores[order][positions[hit]]
        source_mask[hit, column] = True
    filled = np.arange(merged, len(items))
    unset = ~source_mask[filled, POPULAR]  # the popular list's own score where it has the item
    source_scores[filled[unset], POPULAR] = fill_scores[unset]
    source_mask[filled, POPULAR] = True
    rows = np.arange(len(items))
    return CandidateList(
        items=items.astype(np.int64),
        scores=source_scores[rows, source_ids].astype(np.float32),
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
