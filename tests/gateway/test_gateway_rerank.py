"""Re-rank rules on hand-built lists."""

from __future__ import annotations

import math

from gateway.rerank import (
    DAY_MS,
    CandidateItem,
    RerankInputs,
    apply_rules,
    diversify,
    order_by_revenue,
    purchased_within,
)
from gateway.scenarios import DropPurchasedRule, ExcludeContextRule
from recsys.v1 import common_pb2


def item(
    item_id: str, category: str = "", brand: str = "", bid: float = 0.0, rank_score: float | None = None
):
    return CandidateItem(
        item_id=item_id,
        recall_score=0.0,
        source="u2i",
        category=category,
        brand=brand,
        bid=bid,
        rank_score=rank_score,
        score=rank_score or 0.0,
    )


def ids(items) -> list[str]:
    return [i.item_id for i in items]


def test_diversity_caps_categories_in_the_top_n_and_defers_the_rest_in_order():
    items = [
        item("a1", "A"),
        item("a2", "A"),
        item("a3", "A"),
        item("b1", "B"),
        item("a4", "A"),
        item("c1", "C"),
        item("b2", "B"),
    ]
    result = diversify(items, top_n=4, max_per_category=2, max_per_brand=None)
    assert ids(result) == ["a1", "a2", "b1", "c1", "a3", "a4", "b2"]
    assert sorted(ids(result)) == sorted(ids(items))  # nothing lost


def test_diversity_caps_brands_and_leaves_unknown_attributes_uncapped():
    items = [item("x1", brand="X"), item("x2", brand="X"), item("n1"), item("n2"), item("y1", brand="Y")]
    assert ids(diversify(items, top_n=3, max_per_category=None, max_per_brand=1)) == [
        "x1",
        "n1",
        "n2",
        "x2",
        "y1",
    ]


def test_diversity_when_the_caps_cannot_fill_the_top_n():
    items = [item("a1", "A"), item("a2", "A"), item("a3", "A")]
    assert ids(diversify(items, top_n=3, max_per_category=1, max_per_brand=None)) == ["a1", "a2", "a3"]


def test_purchased_within_days_uses_timestamps_and_treats_unknown_times_as_recent():
    now = 100 * DAY_MS
    history = [
        common_pb2.HistoryItem(item_id="old", type=common_pb2.PURCHASE, timestamp_ms=now - 40 * DAY_MS),
        common_pb2.HistoryItem(item_id="new", type=common_pb2.PURCHASE, timestamp_ms=now - 2 * DAY_MS),
        common_pb2.HistoryItem(item_id="unknown_time", type=common_pb2.PURCHASE),
        common_pb2.HistoryItem(item_id="viewed", type=common_pb2.VIEW, timestamp_ms=now),
    ]
    assert purchased_within(history, now, 30) == {"new", "unknown_time"}
    inputs = RerankInputs(history=history, context_item_ids=["ctx"], now_ms=now)
    items = [item("old"), item("new"), item("ctx"), item("viewed"), item("unknown_time")]
    rules = [DropPurchasedRule(days=30), ExcludeContextRule()]
    assert ids(apply_rules(rules, items, inputs)) == ["old", "viewed"]


def test_revenue_orders_by_choice_probability_times_bid_and_applies_the_floor():
    items = [
        item("relevant_cheap", bid=0.1, rank_score=3.0),
        item("less_relevant_rich", bid=2.0, rank_score=2.0),
        item("not_sponsored", bid=0.0, rank_score=5.0),
        item("below_floor", bid=0.04, rank_score=9.0),
    ]
    result = order_by_revenue(items, floor=0.05)
    assert ids(result) == ["less_relevant_rich", "relevant_cheap"]
    weights = [math.exp(s - 9.0) for s in (3.0, 2.0, 5.0, 9.0)]
    assert math.isclose(result[0].score, weights[1] / sum(weights) * 2.0, rel_tol=1e-6)
