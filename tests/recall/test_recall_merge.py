"""Recall's merge of its sources: the quota pass takes exactly what its definition takes (one walk
in merge order), on random lists with heavy overlap, tight and zero quotas, and several cuts."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.recall_merge import SourceList, interleave, take_under_quotas
from recsys.sources import RECALL_SOURCES, SOURCE_INDEX


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


def source_lists(rng: np.random.Generator, quotas: dict[str, int], catalog: int, slack: int):
    """Each source's list: up to its quota plus slack, items drawn from a small catalog so that the
    sources overlap (and repeat items within a list)."""
    lists = {}
    for name, quota in quotas.items():
        length = int(rng.integers(0, quota + slack + 1))
        lists[name] = SourceList(rng.integers(0, catalog, length), np.zeros(length, np.float32))
    return lists


@pytest.mark.parametrize("catalog", [15, 60, 1000])
def test_the_quota_pass_takes_what_one_pass_in_merge_order_takes(catalog: int) -> None:
    rng = np.random.default_rng(catalog)
    names = RECALL_SOURCES[:3]
    for _ in range(400):
        quotas = {s: int(rng.integers(1, 40)) for s in names}
        quotas[names[int(rng.integers(0, 3))]] = int(rng.integers(0, 2))  # a source at 0 or 1
        with np.errstate(divide="ignore"):  # a zero quota ranks its source last (key inf)
            items, sources = interleave(source_lists(rng, quotas, catalog, int(rng.integers(0, 30))), quotas)
        for k in (1, 7, 30, 200):
            expected = one_pass(items, sources, quotas, k)
            assert take_under_quotas(items, sources, quotas, k).tolist() == expected, (quotas, k)
        assert take_under_quotas(items, sources, quotas).tolist() == one_pass(
            items, sources, quotas, len(items)
        )
