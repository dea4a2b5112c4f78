"""Re-rank rules: business filters, diversity, ads revenue, applied in order after ranking.

Each rule is one class: it parses its own settings from the scenario file (``parse``), declares
what it ``needs`` (checked when the file loads) and ``apply``-s itself to columnar
:class:`~recsys.scenario.candidates.Candidates` best first, returning a new selection or order and
never reordering what it does not have to. Item attributes (category, brand, bid) come from the
:class:`~recsys.scenario.catalog.Catalog`, not from the wire. :data:`RULES` maps the names the
file uses to the classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from recsys.jit import hash_slot, hash_table, isin, kernel
from recsys.scenario.candidates import Candidates, History
from recsys.scenario.catalog import Catalog
from recsys.scenario.spec import MAX_NUM_ITEMS, ScenarioConfigError, fields, integer, number
from recsys.v1 import common_pb2

DAY_MS = 86_400_000


@dataclass(frozen=True)
class RerankInputs:
    """What the rules may read besides the candidates."""

    catalog: Catalog
    history: History = field(default_factory=History)
    # Catalog indices of context.item_ids.
    context_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    now_ms: int = 0


def exclude_items(candidates: Candidates, excluded: np.ndarray) -> Candidates:
    """Drop the given catalog indices."""
    if not len(excluded) or not len(candidates):
        return candidates
    return candidates.take(np.flatnonzero(~isin(candidates.items, excluded)))


def purchased_within(history: History, now_ms: int, days: float) -> np.ndarray:
    """Catalog indices purchased in the last ``days`` days; a purchase without a timestamp counts
    as recent."""
    since_ms = now_ms - days * DAY_MS
    timestamps = history.timestamps_ms
    recent = (history.types == common_pb2.PURCHASE) & ((timestamps <= 0) | (timestamps >= since_ms))
    indices = history.indices[recent]
    return indices[indices >= 0]


def diversify(
    candidates: Candidates,
    catalog: Catalog,
    top_n: int,
    max_per_category: int | None,
    max_per_brand: int | None,
) -> Candidates:
    """Greedy caps: fill the top ``top_n`` in order, deferring items whose category or brand is
    already at its cap; deferred items follow, in their original order. Items without a category
    (or brand) are not capped on it."""
    count = len(candidates)
    if not count or top_n <= 0:
        return candidates
    no_cap = count + 1
    order = _diversified_order(
        np.asarray(candidates.items, np.int32),
        np.asarray(catalog.item_category, np.int32),
        np.asarray(catalog.item_brand, np.int32),
        top_n,
        no_cap if max_per_category is None else max_per_category,
        no_cap if max_per_brand is None else max_per_brand,
    )
    if not len(order):  # nothing moved
        return candidates
    return candidates.take(order)


@kernel("i8[:](i4[:], i4[:], i4[:], i8, i8, i8)")
def _diversified_order(
    items: np.ndarray,
    item_category: np.ndarray,
    item_brand: np.ndarray,
    top_n: int,
    category_cap: int,
    brand_cap: int,
) -> np.ndarray:
    """:func:`diversify`'s new order of positions, or an empty array when nothing moves. Counts per
    category and brand live in two small hash tables (at most ``top_n`` keys each)."""
    count = len(items)
    order = np.empty(count, np.int64)
    deferred = np.empty(count, np.int64)
    category_keys, category_counts, category_shift = hash_table(min(top_n, count))
    brand_keys, brand_counts, brand_shift = hash_table(min(top_n, count))
    filled = 0
    moved = 0
    scanned = 0  # the top fills long before the end of a long list
    while scanned < count and filled < top_n:
        item = items[scanned]
        if item < 0 or item >= len(item_category) or item >= len(item_brand):
            raise IndexError("candidate item index outside the catalog")
        category = item_category[item]
        brand = item_brand[item]
        category_slot = hash_slot(category_keys, category_counts, category_shift, category)
        brand_slot = hash_slot(brand_keys, brand_counts, brand_shift, brand)
        if (category >= 0 and category_counts[category_slot] >= category_cap) or (
            brand >= 0 and brand_counts[brand_slot] >= brand_cap
        ):
            deferred[moved] = scanned
            moved += 1
        else:
            order[filled] = scanned
            filled += 1
            if category >= 0:
                category_keys[category_slot] = category
                category_counts[category_slot] = max(category_counts[category_slot], 0) + 1
            if brand >= 0:
                brand_keys[brand_slot] = brand
                brand_counts[brand_slot] = max(brand_counts[brand_slot], 0) + 1
        scanned += 1
    if moved == 0:
        return order[:0]
    order[filled : filled + moved] = deferred[:moved]
    for position in range(scanned, count):
        order[filled + moved + position - scanned] = position
    return order


def explore(
    candidates: Candidates, catalog: Catalog, top_n: int, slots: int, max_interactions: int
) -> Candidates:
    """Give ``slots`` of the top ``top_n`` positions to items with at most ``max_interactions``
    training interactions: the best placed such candidates (the model's choice among them, the
    list being in model order) move to positions spread evenly through the top ``top_n``; cold
    items already there count. Everything else keeps its order. No-op without interaction counts."""
    count = len(candidates)
    if not slots or not count or not len(catalog.item_interactions):
        return candidates
    top_n = min(top_n, count)
    cold = np.flatnonzero(catalog.item_interactions[candidates.items] <= max_interactions)
    wanted = min(slots, top_n) - int((cold < top_n).sum())
    promoted = cold[cold >= top_n][: max(wanted, 0)]
    if not len(promoted):
        return candidates
    rest = np.setdiff1d(np.arange(count), promoted, assume_unique=True)  # sorted: model order kept
    # Target positions spread through the top: e.g. 2 slots in 20 -> positions 6 and 13.
    targets = (np.arange(1, len(promoted) + 1) * top_n) // (len(promoted) + 1)
    order = np.empty(count, dtype=np.int64)
    is_target = np.zeros(count, dtype=bool)
    is_target[targets] = True
    order[targets] = promoted
    order[~is_target] = rest
    return candidates.take(order)


def order_by_revenue(candidates: Candidates, catalog: Catalog, floor: float) -> Candidates:
    """Expected revenue = P(choice) x bid, P from a softmax over the list's scores (the ranker is
    trained with a listwise softmax). Items bidding below ``floor`` (or not at all) are dropped;
    the score becomes the expected revenue."""
    if not len(candidates):
        return candidates
    scores = (candidates.rank_scores if candidates.rank_scores is not None else candidates.scores).astype(
        np.float64
    )
    weights = np.exp(scores - scores.max())
    choice = weights / weights.sum()
    bids = catalog.item_bid[candidates.items].astype(np.float64)
    kept = np.flatnonzero((bids > 0) & (bids >= floor))
    revenue = choice[kept] * bids[kept]
    order = kept[np.argsort(-revenue, kind="stable")]
    ranked = candidates.take(order)
    return ranked.with_scores((choice[order] * bids[order]).astype(np.float32))


# The configured rules: each declares what it needs and applies itself.


@dataclass(frozen=True)
class DiversityRule:
    """At most ``max_per_category``/``max_per_brand`` items of one category/brand in the top ``top_n``."""

    top_n: int
    max_per_category: int | None = None
    max_per_brand: int | None = None

    name: ClassVar[str] = "diversity"
    needs: ClassVar[frozenset[str]] = frozenset({"candidates", "attributes"})
    reads: ClassVar[frozenset[str]] = frozenset()  # optional request inputs

    @classmethod
    def parse(cls, body: Any, where: str) -> DiversityRule:
        body = fields(body, where, {"top_n", "max_per_category", "max_per_brand"})
        per_category = body.get("max_per_category")
        per_brand = body.get("max_per_brand")
        if per_category is None and per_brand is None:
            raise ScenarioConfigError(f"{where}: set max_per_category and/or max_per_brand")
        return cls(
            top_n=integer(body.get("top_n", 20), where, "top_n", 1, MAX_NUM_ITEMS),
            max_per_category=None
            if per_category is None
            else integer(per_category, where, "max_per_category", 1, MAX_NUM_ITEMS),
            max_per_brand=None
            if per_brand is None
            else integer(per_brand, where, "max_per_brand", 1, MAX_NUM_ITEMS),
        )

    def apply(self, candidates: Candidates, inputs: RerankInputs) -> Candidates:
        return diversify(candidates, inputs.catalog, self.top_n, self.max_per_category, self.max_per_brand)


@dataclass(frozen=True)
class DropPurchasedRule:
    """Drop items the user purchased within the last ``days`` days."""

    days: float

    name: ClassVar[str] = "drop_purchased"
    needs: ClassVar[frozenset[str]] = frozenset({"candidates", "history"})
    reads: ClassVar[frozenset[str]] = frozenset()  # optional request inputs

    @classmethod
    def parse(cls, body: Any, where: str) -> DropPurchasedRule:
        body = fields(body, where, {"days"})
        return cls(days=number(body.get("days"), where, "days", 0, 36_500))

    def apply(self, candidates: Candidates, inputs: RerankInputs) -> Candidates:
        return exclude_items(candidates, purchased_within(inputs.history, inputs.now_ms, self.days))


@dataclass(frozen=True)
class ExcludeContextRule:
    """Drop the context items (the viewed item, the cart items)."""

    name: ClassVar[str] = "exclude_context"
    needs: ClassVar[frozenset[str]] = frozenset({"candidates"})
    reads: ClassVar[frozenset[str]] = frozenset({"context.item_ids"})

    @classmethod
    def parse(cls, body: Any, where: str) -> ExcludeContextRule:
        if body not in (None, True):
            raise ScenarioConfigError(f"{where}: takes no settings (write `exclude_context: true`)")
        return cls()

    def apply(self, candidates: Candidates, inputs: RerankInputs) -> Candidates:
        return exclude_items(candidates, inputs.context_items)


@dataclass(frozen=True)
class RevenueRule:
    """Order by expected revenue: P(choice) from the rank scores x bid; bids below ``floor`` dropped."""

    floor: float = 0.0

    name: ClassVar[str] = "revenue"
    needs: ClassVar[frozenset[str]] = frozenset({"candidates", "rank_scores", "bids"})
    reads: ClassVar[frozenset[str]] = frozenset()  # optional request inputs

    @classmethod
    def parse(cls, body: Any, where: str) -> RevenueRule:
        body = fields(body, where, {"floor"})
        return cls(floor=number(body.get("floor", 0.0), where, "floor", 0, 1e9))

    def apply(self, candidates: Candidates, inputs: RerankInputs) -> Candidates:
        return order_by_revenue(candidates, inputs.catalog, self.floor)


@dataclass(frozen=True)
class ExploreRule:
    """A ``share`` of the top ``top_n`` positions for items with at most ``max_interactions``
    training interactions, so new items get impressions; the model picks which (its order)."""

    top_n: int = 20
    share: float = 0.1
    max_interactions: int = 5

    name: ClassVar[str] = "explore"
    needs: ClassVar[frozenset[str]] = frozenset({"candidates", "attributes"})
    reads: ClassVar[frozenset[str]] = frozenset()  # optional request inputs

    @property
    def slots(self) -> int:
        return round(self.top_n * self.share)

    @classmethod
    def parse(cls, body: Any, where: str) -> ExploreRule:
        body = fields(body, where, {"top_n", "share", "max_interactions"})
        rule = cls(
            top_n=integer(body.get("top_n", 20), where, "top_n", 1, MAX_NUM_ITEMS),
            share=number(body.get("share", 0.1), where, "share", 0, 1),
            max_interactions=integer(body.get("max_interactions", 5), where, "max_interactions", 0, 10**9),
        )
        if rule.share > 0 and rule.slots == 0:
            raise ScenarioConfigError(f"{where}: share {rule.share} of top_n {rule.top_n} is no position")
        return rule

    def apply(self, candidates: Candidates, inputs: RerankInputs) -> Candidates:
        return explore(candidates, inputs.catalog, self.top_n, self.slots, self.max_interactions)


RerankRule = DiversityRule | DropPurchasedRule | ExcludeContextRule | RevenueRule | ExploreRule
RULES: Mapping[str, type[RerankRule]] = {
    rule.name: rule
    for rule in (DiversityRule, DropPurchasedRule, ExcludeContextRule, RevenueRule, ExploreRule)
}


def parse_rule(spec: Any, where: str) -> RerankRule:
    """One ``{name: settings}`` entry of a rerank stage."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ScenarioConfigError(f"{where}: each rule is a one-key mapping, e.g. {{diversity: {{...}}}}")
    ((name, body),) = spec.items()
    rule = RULES.get(name)
    if rule is None:
        raise ScenarioConfigError(f"{where}: unknown rule {name!r}; known: {', '.join(RULES)}")
    return rule.parse(body, f"{where}, rule {name!r}")


def apply_rules(rules: Sequence[RerankRule], candidates: Candidates, inputs: RerankInputs) -> Candidates:
    """Apply the rules in order."""
    for rule in rules:
        candidates = rule.apply(candidates, inputs)
    return candidates
