"""Re-rank rules applied in the gateway after ranking: business filters, diversity, ads revenue.

Each rule takes the ordered list of :class:`CandidateItem` (best first) and returns a new list;
rules never reorder what they do not have to.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from gateway.scenarios import (
    DiversityRule,
    DropPurchasedRule,
    ExcludeContextRule,
    RerankRule,
    RevenueRule,
)
from recsys.v1 import common_pb2

DAY_MS = 86_400_000


@dataclass
class CandidateItem:
    """One candidate as it moves through the pipeline."""

    item_id: str
    recall_score: float
    source: str
    source_scores: dict[str, float] = field(default_factory=dict)
    category: str = ""
    brand: str = ""
    bid: float = 0.0
    rank_score: float | None = None
    attended_item_ids: list[str] = field(default_factory=list)
    score: float = 0.0  # the score the response carries (rank, recall, or expected revenue)


@dataclass(frozen=True)
class RerankInputs:
    """What the rules may read besides the candidates."""

    history: Sequence[common_pb2.HistoryItem] = ()
    context_item_ids: Sequence[str] = ()
    now_ms: int = 0


def exclude_items(items: Sequence[CandidateItem], excluded: Iterable[str]) -> list[CandidateItem]:
    """Drop the given item ids."""
    excluded_set = set(excluded)
    return [item for item in items if item.item_id not in excluded_set]


def purchased_within(history: Sequence[common_pb2.HistoryItem], now_ms: int, days: float) -> set[str]:
    """Items purchased in the last ``days`` days; a purchase without a timestamp counts as recent."""
    since_ms = now_ms - days * DAY_MS
    return {
        entry.item_id
        for entry in history
        if entry.type == common_pb2.PURCHASE and (entry.timestamp_ms <= 0 or entry.timestamp_ms >= since_ms)
    }


def diversify(
    items: Sequence[CandidateItem],
    top_n: int,
    max_per_category: int | None,
    max_per_brand: int | None,
) -> list[CandidateItem]:
    """Greedy caps: fill the top ``top_n`` in order, deferring items whose category or brand is
    already at its cap; deferred items follow, in their original order. Items without a category
    (or brand) are not capped on it."""
    top: list[CandidateItem] = []
    deferred: list[CandidateItem] = []
    per_category: Counter[str] = Counter()
    per_brand: Counter[str] = Counter()
    for position, item in enumerate(items):
        if len(top) >= top_n:
            return top + deferred + list(items[position:])
        category_full = (
            bool(item.category)
            and max_per_category is not None
            and (per_category[item.category] >= max_per_category)
        )
        brand_full = bool(item.brand) and max_per_brand is not None and per_brand[item.brand] >= max_per_brand
        if category_full or brand_full:
            deferred.append(item)
            continue
        top.append(item)
        per_category[item.category] += 1
        per_brand[item.brand] += 1
    return top + deferred


def order_by_revenue(items: Sequence[CandidateItem], floor: float) -> list[CandidateItem]:
    """Expected revenue = P(choice) x bid, P from a softmax over the list's scores (the ranker is
    trained with a listwise softmax). Items bidding below ``floor`` (or not at all) are dropped;
    the score becomes the expected revenue."""
    if not items:
        return []
    scores = [item.rank_score if item.rank_score is not None else item.score for item in items]
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    kept = []
    for item, weight in zip(items, weights, strict=True):
        if item.bid <= 0 or item.bid < floor:
            continue
        item.score = weight / total * item.bid
        kept.append(item)
    kept.sort(key=lambda item: item.score, reverse=True)
    return kept


def apply_rule(rule: RerankRule, items: Sequence[CandidateItem], inputs: RerankInputs) -> list[CandidateItem]:
    """Apply one configured rule."""
    if isinstance(rule, ExcludeContextRule):
        return exclude_items(items, inputs.context_item_ids)
    if isinstance(rule, DropPurchasedRule):
        return exclude_items(items, purchased_within(inputs.history, inputs.now_ms, rule.days))
    if isinstance(rule, DiversityRule):
        return diversify(items, rule.top_n, rule.max_per_category, rule.max_per_brand)
    if isinstance(rule, RevenueRule):
        return order_by_revenue(items, rule.floor)
    raise TypeError(f"unknown re-rank rule {rule!r}")


def apply_rules(
    rules: Sequence[RerankRule], items: Sequence[CandidateItem], inputs: RerankInputs
) -> list[CandidateItem]:
    """Apply the rules in order."""
    result = list(items)
    for rule in rules:
        result = apply_rule(rule, result, inputs)
    return result
