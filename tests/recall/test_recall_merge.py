"""Recall's merge of its sources (compiled kernels): the merged candidates, their sources and the
score matrix equal what the merge's definition gives (interleave by rank over quota, one walk in
merge order under the quotas, top-up from the fill list, each candidate's score in every source),
on random lists with heavy overlap, repeated items, tight and zero quotas, several cuts, fills."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.recall_merge import CandidateList, SourceList, merge_sources
from recsys.sources import RECALL_SOURCES, SOURCE_INDEX

POPULAR = SOURCE_INDEX["popular"]


def one_pass(items: np.ndarray, source_ids: np.ndarray, quotas: dict[str, int], k: int) -> list[int]:
    """The definition: walk the merge order once; an entry is taken when its item is new and its
    source is under quota; an entry over quota claims nothing."""
    limit = {SOURCE_INDEX[name]: quota for name, quota in quotas.items()}
    taken = dict.fromkeys(limit, 0)
    seen: set[int] = set()
    chosen: list[int] = []
    for position, (item, source) in enumerate(zip(items.tolist(), source_ids.tolist(), strict=True)):
        if len(chosen) >= k:
            break
        if item in seen or taken.get(source, 0) >= limit.get(source, 0):
            continue
        seen.add(item)
        taken[source] += 1
        chosen.append(position)
    return chosen


def reference_merge(
    lists: dict[str, SourceList], quotas: dict[str, int], k: int, fill: SourceList | None
) -> CandidateList:
    """The merge written out with NumPy sorts and Python loops."""
    names = [s for s in RECALL_SOURCES if s in lists and len(lists[s].items)]
    items = np.concatenate([lists[s].items for s in names] + [np.zeros(0, np.int64)]).astype(np.int64)
    source_ids = np.concatenate([np.full(len(lists[s].items), SOURCE_INDEX[s]) for s in names] + [[]])
    with np.errstate(divide="ignore"):  # a zero quota ranks its source last (key inf)
        keys = np.concatenate([(np.arange(len(lists[s].items)) + 1.0) / quotas[s] for s in names] + [[]])
    order = np.lexsort((source_ids, keys))
    items, source_ids = items[order], source_ids[order].astype(np.int64)
    chosen = one_pass(items, source_ids, quotas, k)
    items, source_ids = list(items[chosen]), list(source_ids[chosen])
    fill_rows: dict[int, float] = {}
    if fill is not None and len(items) < k:
        merged = set(items)
        for item, score in zip(fill.items.tolist(), fill.scores.tolist(), strict=True):
            if len(items) >= k:
                break
            if item not in merged:
                fill_rows[len(items)] = score
                items.append(item)
                source_ids.append(POPULAR)
    source_scores = np.zeros((len(items), len(RECALL_SOURCES)), np.float32)
    source_mask = np.zeros((len(items), len(RECALL_SOURCES)), bool)
    for name, found in lists.items():
        first: dict[int, float] = {}
        for item, score in zip(found.items.tolist(), found.scores.tolist(), strict=True):
            first.setdefault(item, score)
        for row, item in enumerate(items):
            if item in first:
                source_scores[row, SOURCE_INDEX[name]] = first[item]
                source_mask[row, SOURCE_INDEX[name]] = True
    for row, score in fill_rows.items():
        if not source_mask[row, POPULAR]:
            source_scores[row, POPULAR] = score
            source_mask[row, POPULAR] = True
    rows = np.arange(len(items))
    return CandidateList(
        items=np.asarray(items, np.int64),
        scores=source_scores[rows, np.asarray(source_ids, np.int64)],
        source_ids=np.asarray(source_ids, np.uint8),
        source_scores=source_scores,
        source_mask=source_mask,
    )


def source_lists(rng: np.random.Generator, quotas: dict[str, int], catalog: int, slack: int):
    """Each source's list: up to its quota plus slack, items drawn from a small catalog so that the
    sources overlap (and repeat items within a list); scores rounded so that some tie."""
    lists = {}
    for name, quota in quotas.items():
        length = int(rng.integers(0, quota + slack + 1))
        scores = np.round(rng.normal(size=length), 1).astype(np.float32)
        lists[name] = SourceList(rng.integers(0, catalog, length), scores)
    return lists


def assert_same(got: CandidateList, expected: CandidateList, context) -> None:
    assert got.items.dtype == np.int64 and got.source_ids.dtype == np.uint8, context
    assert got.scores.dtype == np.float32 and got.source_scores.dtype == np.float32, context
    assert got.items.tolist() == expected.items.tolist(), context
    assert got.source_ids.tolist() == expected.source_ids.tolist(), context
    assert np.array_equal(got.scores, expected.scores), context
    assert np.array_equal(got.source_scores, expected.source_scores), context
    assert np.array_equal(got.source_mask, expected.source_mask), context


@pytest.mark.parametrize("catalog", [15, 60, 1000])
def test_the_merge_takes_what_its_definition_takes(catalog: int) -> None:
    rng = np.random.default_rng(catalog)
    for case in range(300):
        names = list(
            rng.choice(RECALL_SOURCES, size=int(rng.integers(1, len(RECALL_SOURCES) + 1)), replace=False)
        )
        quotas = {s: int(rng.integers(1, 40)) for s in names}
        quotas[names[int(rng.integers(0, len(names)))]] = int(rng.integers(0, 2))  # a source at 0 or 1
        lists = source_lists(rng, quotas, catalog, int(rng.integers(0, 30)))
        fill = None
        if case % 2:
            fill_items = rng.permutation(catalog)[: int(rng.integers(0, 80))]
            fill = SourceList(fill_items, rng.random(len(fill_items)).astype(np.float32))
        for k in (0, 1, 7, 30, 200):
            assert_same(
                merge_sources(lists, quotas, k, fill), reference_merge(lists, quotas, k, fill), (case, k)
            )


def test_the_fill_is_fetched_only_when_the_sources_fall_short() -> None:
    lists = {"u2i": SourceList(np.arange(10), np.linspace(1, 0, 10, dtype=np.float32))}
    calls = []

    def fill() -> SourceList:
        calls.append(1)
        return SourceList(np.arange(5, 30), np.ones(25, np.float32))

    assert len(merge_sources(lists, {"u2i": 10}, 10, fill)) == 10 and not calls
    merged = merge_sources(lists, {"u2i": 10}, 20, fill)
    assert calls == [1]
    assert merged.items.tolist() == list(range(20))
    assert merged.sources == ["u2i"] * 10 + ["popular"] * 10
    assert merged.source_mask[10:, POPULAR].all() and not merged.source_mask[:10, POPULAR].any()


def test_nothing_to_merge_gives_an_empty_list() -> None:
    merged = merge_sources({}, {"u2i": 5}, 5)
    assert len(merged) == 0 and merged.source_scores.shape == (0, len(RECALL_SOURCES))
    assert len(merge_sources({"u2i": SourceList(np.arange(4), np.ones(4, np.float32))}, {"u2i": 4}, -1)) == 0
    empty = {"u2i": SourceList.empty()}
    assert len(merge_sources(empty, {"u2i": 5}, 5, SourceList(np.arange(3), np.ones(3, np.float32)))) == 3
