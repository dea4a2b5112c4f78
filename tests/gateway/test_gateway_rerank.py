"""Re-rank rules on hand-built columnar lists over a small catalog."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from recsys.scenario.candidates import Candidates
from recsys.scenario.catalog import Catalog
from recsys.scenario.pipeline import to_history
from recsys.scenario.rules import (
    DAY_MS,
    DropPurchasedRule,
    ExcludeContextRule,
    ExploreRule,
    RerankInputs,
    apply_rules,
    diversify,
    explore,
    order_by_revenue,
    purchased_within,
)
from recsys.serving.wire import catalog_fingerprint
from recsys.v1 import common_pb2


def catalog_of(items: list[tuple[str, str, str, float]]) -> Catalog:
    """A catalog from (item_id, category, brand, bid); "" = no category/brand."""
    categories = sorted({c for _, c, _, _ in items if c})
    brands = sorted({b for _, _, b, _ in items if b})
    ids = [item_id for item_id, _, _, _ in items]
    return Catalog(
        fingerprint=catalog_fingerprint(ids),
        version="test",
        item_ids=ids,
        item_category=np.asarray([categories.index(c) if c else -1 for _, c, _, _ in items], np.int32),
        item_brand=np.asarray([brands.index(b) if b else -1 for _, _, b, _ in items], np.int32),
        item_bid=np.asarray([bid for *_, bid in items], np.float32),
        category_names=categories,
        brand_names=brands,
        popular=np.arange(len(items), dtype=np.int32),
    )


def listed(catalog: Catalog, rank_scores: list[float] | None = None) -> Candidates:
    """Every catalog item, in catalog order, as a recall list (optionally ranked)."""
    count = len(catalog)
    candidates = Candidates.from_source(np.arange(count, dtype=np.int32), np.ones(count, np.float32), "u2i")
    if rank_scores is None:
        return candidates
    scores = np.asarray(rank_scores, np.float32)
    return candidates.with_scores(scores, rank_scores=scores)


def ids(catalog: Catalog, candidates: Candidates) -> list[str]:
    return [catalog.item_ids[i] for i in candidates.items.tolist()]


def test_diversity_caps_categories_in_the_top_n_and_defers_the_rest_in_order():
    catalog = catalog_of([(i, i[0].upper(), "", 0.0) for i in ("a1", "a2", "a3", "b1", "a4", "c1", "b2")])
    result = diversify(listed(catalog), catalog, top_n=4, max_per_category=2, max_per_brand=None)
    assert ids(catalog, result) == ["a1", "a2", "b1", "c1", "a3", "a4", "b2"]
    assert sorted(ids(catalog, result)) == sorted(catalog.item_ids)  # nothing lost


def test_diversity_caps_brands_and_leaves_unknown_attributes_uncapped():
    catalog = catalog_of(
        [
            ("x1", "", "X", 0.0),
            ("x2", "", "X", 0.0),
            ("n1", "", "", 0.0),
            ("n2", "", "", 0.0),
            ("y1", "", "Y", 0.0),
        ]
    )
    result = diversify(listed(catalog), catalog, top_n=3, max_per_category=None, max_per_brand=1)
    assert ids(catalog, result) == ["x1", "n1", "n2", "x2", "y1"]


def test_diversity_when_the_caps_cannot_fill_the_top_n():
    catalog = catalog_of([("a1", "A", "", 0.0), ("a2", "A", "", 0.0), ("a3", "A", "", 0.0)])
    result = diversify(listed(catalog), catalog, top_n=3, max_per_category=1, max_per_brand=None)
    assert ids(catalog, result) == ["a1", "a2", "a3"]


def reference_diversify(
    items: list[int], categories: list[int], brands: list[int], top_n: int, category_cap: int, brand_cap: int
) -> list[int]:
    """The greedy caps written plainly: the new order of positions."""
    top: list[int] = []
    deferred: list[int] = []
    per_category: dict[int, int] = {}
    per_brand: dict[int, int] = {}
    scanned = 0
    for position, item in enumerate(items):
        if len(top) >= top_n:
            break
        scanned = position + 1
        category, brand = categories[item], brands[item]
        if (category >= 0 and per_category.get(category, 0) >= category_cap) or (
            brand >= 0 and per_brand.get(brand, 0) >= brand_cap
        ):
            deferred.append(position)
            continue
        top.append(position)
        per_category[category] = per_category.get(category, 0) + 1
        per_brand[brand] = per_brand.get(brand, 0) + 1
    return top + deferred + list(range(scanned, len(items)))


def test_diversity_orders_like_the_plain_greedy_loop_on_random_lists():
    rng = np.random.default_rng(7)
    for case in range(2000):
        size = int(rng.integers(1, 60))
        catalog = catalog_of(
            [
                (
                    f"i{i}",
                    f"c{rng.integers(0, 6)}" if rng.random() < 0.8 else "",
                    f"b{rng.integers(0, 40)}" if rng.random() < 0.9 else "",
                    0.0,
                )
                for i in range(size)
            ]
        )
        chosen = rng.choice(size, size=int(rng.integers(0, size + 1)), replace=False).astype(np.int32)
        candidates = Candidates.from_source(chosen, np.ones(len(chosen), np.float32), "u2i")
        top_n = int(rng.integers(1, 30))
        per_category = None if rng.random() < 0.2 else int(rng.integers(1, 4))
        per_brand = None if per_category is not None and rng.random() < 0.5 else int(rng.integers(1, 3))
        no_cap = len(chosen) + 1
        expected = reference_diversify(
            chosen.tolist(),
            catalog.item_category.tolist(),
            catalog.item_brand.tolist(),
            top_n,
            no_cap if per_category is None else per_category,
            no_cap if per_brand is None else per_brand,
        )
        result = diversify(candidates, catalog, top_n, per_category, per_brand)
        assert result.items.tolist() == chosen[expected].tolist(), case


def test_diversity_refuses_an_item_outside_the_catalog():
    catalog = catalog_of([("a1", "A", "", 0.0), ("a2", "A", "", 0.0)])
    outside = Candidates.from_source(np.asarray([0, 5], np.int32), np.ones(2, np.float32), "u2i")
    with pytest.raises(IndexError):
        diversify(outside, catalog, top_n=2, max_per_category=1, max_per_brand=None)


def test_purchased_within_days_uses_timestamps_and_treats_unknown_times_as_recent():
    now = 100 * DAY_MS
    catalog = catalog_of([(i, "", "", 0.0) for i in ("old", "new", "ctx", "viewed", "unknown_time")])
    history = to_history(
        ["old", "new", "unknown_time", "viewed", "not_in_catalog"],
        [common_pb2.PURCHASE, common_pb2.PURCHASE, common_pb2.PURCHASE, common_pb2.VIEW, common_pb2.PURCHASE],
        [now - 40 * DAY_MS, now - 2 * DAY_MS, 0, now, now],
        catalog,
    )
    assert sorted(catalog.item_ids[i] for i in purchased_within(history, now, 30)) == ["new", "unknown_time"]
    inputs = RerankInputs(
        catalog=catalog, history=history, context_items=catalog.indices(["ctx"]), now_ms=now
    )
    rules = [DropPurchasedRule(days=30), ExcludeContextRule()]
    assert ids(catalog, apply_rules(rules, listed(catalog), inputs)) == ["old", "viewed"]


def test_revenue_orders_by_choice_probability_times_bid_and_applies_the_floor():
    catalog = catalog_of(
        [
            ("relevant_cheap", "", "", 0.1),
            ("less_relevant_rich", "", "", 2.0),
            ("not_sponsored", "", "", 0.0),
            ("below_floor", "", "", 0.04),
        ]
    )
    result = order_by_revenue(listed(catalog, [3.0, 2.0, 5.0, 9.0]), catalog, floor=0.05)
    assert ids(catalog, result) == ["less_relevant_rich", "relevant_cheap"]
    weights = [math.exp(s - 9.0) for s in (3.0, 2.0, 5.0, 9.0)]
    assert math.isclose(float(result.scores[0]), weights[1] / sum(weights) * 2.0, rel_tol=1e-6)


def test_explore_moves_the_best_cold_candidates_to_spread_positions_and_keeps_the_rest_in_order():
    catalog = catalog_of([(f"i{n}", "", "", 0.0) for n in range(12)])
    # Items i8, i10 and i11 have few interactions; the list is in model order i0..i11.
    interactions = np.full(12, 100, np.int32)
    interactions[[8, 10, 11]] = [0, 3, 1]
    catalog = dataclasses.replace(catalog, item_interactions=interactions)
    result = explore(listed(catalog), catalog, top_n=6, slots=2, max_interactions=5)
    # The two best-placed cold items (i8, i10: the model's choice) go to positions 2 and 4.
    assert ids(catalog, result) == ["i0", "i1", "i8", "i2", "i10", "i3", "i4", "i5", "i6", "i7", "i9", "i11"]
    # A cold item already in the top counts toward the slots; nothing else moves.
    interactions[2] = 0
    catalog = dataclasses.replace(catalog, item_interactions=interactions)
    result = explore(listed(catalog), catalog, top_n=6, slots=2, max_interactions=5)
    assert ids(catalog, result)[:6] == ["i0", "i1", "i2", "i8", "i3", "i4"]
    # Without interaction counts (an older recall) the rule changes nothing.
    plain = catalog_of([(f"i{n}", "", "", 0.0) for n in range(12)])
    assert ids(plain, explore(listed(plain), plain, 6, 2, 5)) == plain.item_ids
    assert ExploreRule(top_n=20, share=0.1).slots == 2
