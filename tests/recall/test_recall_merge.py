"""Recall's merge of its sources: the quota pass takes exactly what its definition takes (one walk
in merge order), on random lists with heavy overlap, tight and zero quotas, and several cuts."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.recall_merge import take_under_quotas
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


def merge_order(rng: np.random.Generator, quotas: dict[str, int], catalog: int, slack: int):
    """Each source's list (its quota plus slack, items drawn from a small catalog so that they
    overlap), interleaved by rank relative to quota as merge_sources does."""
    names = list(quotas)
    lengths = {s: int(rng.integers(0, quotas[s] + slack + 1)) for s in names}
    items = np.concatenate([rng.integers(0, catalog, lengths[s]) for s in names])
    sources = np.concatenate([np.full(lengths[s], SOURCE_INDEX[s]) for s in names])
    keys = np.concatenate([(np.arange(lengths[s]) + 1.0) / max(quotas[s], 1e-9) for s in names])
    order = np.lexsort((sources, keys))
    return items[order], sources[order]


@pytest.mark.parametrize("catalog", [15, 60, 1000])
def test_the_quota_pass_takes_what_one_pass_in_merge_order_takes(catalog: int) -> None:
    rng = np.random.default_rng(catalog)
    names = RECALL_SOURCES[:3]
    for _ in range(400):
        quotas = {s: int(rng.integers(0, 40)) for s in names}
        items, sources = merge_order(rng, quotas, catalog, slack=int(rng.integers(0, 30)))
        for k in (1, 7, 30, 200):
            expected = one_pass(items, sources, quotas, k)
            assert take_under_quotas(items, sources, quotas, k).tolist() == expected, (quotas, k)
        assert take_under_quotas(items, sources, quotas).tolist() == one_pass(
            items, sources, quotas, len(items)
        )
