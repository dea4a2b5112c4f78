"""Seeded synthetic e-commerce log: the offline default for ``make run`` and the tests.

What it models, so that a sequential recommender has something real to learn:

- A catalog of categories and brands (each brand sells in one category), log-normal prices per
  category with a brand premium, Zipf item popularity, and a sponsored ~5% with bids.
- Titles that carry signal (the text tower's cold-start test bed): the brand, a word of the
  category's own vocabulary, the category name, an appeal word from the vocabulary of the item's
  popularity tier (the latent the other columns do not show; one in five drawn from another tier),
  and a model code. Drawn from their own random stream, so interactions and every other column are
  exactly those of a generator without titles.
- Complementary categories: every category has complement categories (phone -> phone case) and
  every item a short list of complement items in them; after an ADD_TO_CART or PURCHASE the next
  item comes from that list with high probability (scenario ``cart``).
- Similar items: every item has a list of same-category items (same brand favoured) that the
  item-detail page shows; after a VIEW or CLICK the next item often comes from it
  (scenario ``item_detail``).
- Users with category affinities that drift from session to session; sessions start from the
  ``home`` feed, a ``category`` page or an ``ads`` slot.
- One row per item visit, its ``event_type`` the deepest funnel step reached
  (VIEW -> CLICK -> ADD_TO_CART -> PURCHASE; a purchase implies the click and cart before it), so
  VIEW rows are the most common and PURCHASE rows the rarest. A user never visits the same item
  twice, so a leave-one-out target never sits in its own history (as in Amazon Beauty).
- Timestamps (epoch milliseconds) strictly increase within each user; the file is a global log
  sorted by time.

Only numpy is used; the same config and seed give byte-identical files.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from itertools import accumulate
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recsys.data.dataset import EventType

INTERACTIONS_FILE = "interactions.csv"
ITEMS_FILE = "items.csv"
GENERATOR_FILE = "generator.json"

# Category pairs (first -> second is the strong complement); more categories get generic names.
_CATEGORY_PAIRS = (
    ("phone", "phone_case"),
    ("laptop", "laptop_bag"),
    ("camera", "memory_card"),
    ("coffee_maker", "coffee_beans"),
    ("running_shoes", "sports_socks"),
    ("shampoo", "conditioner"),
    ("printer", "ink_cartridge"),
    ("game_console", "video_game"),
    ("tent", "sleeping_bag"),
    ("bicycle", "bike_helmet"),
    ("television", "soundbar"),
    ("headphones", "headphone_case"),
    ("tablet", "stylus"),
    ("blender", "smoothie_cups"),
    ("guitar", "guitar_strings"),
    ("dog_food", "dog_toy"),
    ("baby_stroller", "baby_blanket"),
    ("electric_razor", "shaving_gel"),
    ("yoga_mat", "yoga_blocks"),
    ("watch", "watch_strap"),
)
# Brand names are 2-3 of these syllables ("Kalo", "Venzitor").
# fmt: off
_SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "tor", "zi", "no",
              "qua", "lex", "dor", "fi", "sa", "pe", "tru", "vo")
# fmt: on
# Appeal words by popularity tier (most popular first): what a title says that no other column does.
_TIER_WORDS = (
    ("bestselling", "iconic", "flagship"),
    ("popular", "classic", "favourite"),
    ("everyday", "standard", "essential"),
    ("basic", "budget", "simple"),
)
_TIER_NOISE = 0.2  # share of titles whose appeal word comes from a random tier
_CATEGORY_WORDS = 3  # descriptor words per category (syllable-made, e.g. "zinora")
_TITLE_STREAM = 0x7469746C  # "titl": the titles' own random stream, beside the main seed


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings; every field is recorded in ``generator.json`` beside the files."""

    num_users: int = 20_000
    num_items: int = 5_000
    num_categories: int = 40
    num_brands: int = 200
    seed: int = 7
    zipf_exponent: float = 1.0  # item popularity ~ 1 / rank^zipf_exponent
    sponsored_fraction: float = 0.05
    mean_events_per_user: float = 20.0
    min_events_per_user: int = 5
    max_events_per_user: int = 200
    mean_session_length: float = 6.0
    affinity_concentration: float = 0.3  # Dirichlet alpha of a user's category affinity (small = focused)
    affinity_drift: float = 0.2  # P(a new session starts a new interest: half the affinity moves to it)
    similar_items: int = 6  # per item: same-category items the item-detail page shows
    complement_items: int = 4  # per item: items of complement categories the cart page shows
    similar_probability: float = 0.55  # after VIEW/CLICK: next item from the similar list
    complement_probability: float = 0.7  # after ADD_TO_CART/PURCHASE: next item from complements
    click_rate: float = 0.35  # P(CLICK | VIEW)
    cart_rate: float = 0.3  # P(ADD_TO_CART | CLICK)
    purchase_rate: float = 0.45  # P(PURCHASE | ADD_TO_CART)
    start_time_ms: int = 1_704_067_200_000  # 2024-01-01T00:00:00Z
    span_days: float = 90.0

    @classmethod
    def tiny(cls, seed: int = 7) -> SyntheticConfig:
        """About 300 users x 200 items: builds in well under a second (tests)."""
        return cls(
            num_users=300,
            num_items=200,
            num_categories=8,
            num_brands=16,
            seed=seed,
            mean_events_per_user=12.0,
            similar_items=4,
            complement_items=3,
        )

    @classmethod
    def quick(cls, seed: int = 7) -> SyntheticConfig:
        """The ``make run`` default: 4,000 users x 2,000 items, a few seconds."""
        return cls(num_users=4_000, num_items=2_000, num_categories=24, num_brands=96, seed=seed)

    @classmethod
    def default(cls, seed: int = 7) -> SyntheticConfig:
        """20,000 users x 5,000 items (~400k events): offline evaluation."""
        return cls(seed=seed)

    @classmethod
    def preset(cls, name: str, seed: int | None = None) -> SyntheticConfig:
        """``tiny``, ``quick`` or ``default``, optionally with another seed."""
        factories = {"tiny": cls.tiny, "quick": cls.quick, "default": cls.default}
        if name not in factories:
            raise ValueError(f"preset: must be one of {', '.join(factories)}, got {name!r}")
        return factories[name]() if seed is None else factories[name](seed=seed)

    @classmethod
    def from_dict(cls, values: dict) -> SyntheticConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate(self) -> None:
        problems = []
        if self.num_categories < 2:
            problems.append("num_categories: must be >= 2")
        if self.num_items < 2 * self.num_categories:
            problems.append("num_items: must be >= 2 * num_categories")
        if self.num_brands < self.num_categories:
            problems.append("num_brands: must be >= num_categories (every category needs a brand)")
        if self.num_users < 1:
            problems.append("num_users: must be >= 1")
        if not 1 <= self.min_events_per_user <= self.max_events_per_user:
            problems.append("min_events_per_user: must be in 1..max_events_per_user")
        if self.max_events_per_user > self.num_items:
            problems.append("max_events_per_user: a user visits each item at most once, so <= num_items")
        if self.mean_events_per_user < self.min_events_per_user:
            problems.append("mean_events_per_user: must be >= min_events_per_user")
        for name in (
            "sponsored_fraction",
            "affinity_drift",
            "similar_probability",
            "complement_probability",
            "click_rate",
            "cart_rate",
            "purchase_rate",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name}: must be in [0, 1]")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class _Catalog:
    category: np.ndarray  # [num_items] dense category id
    brand: np.ndarray  # [num_items] dense brand id
    price: np.ndarray  # [num_items]
    bid: np.ndarray  # [num_items], 0 when not sponsored
    popularity: np.ndarray  # [num_items] sampling weight (Zipf)
    category_names: list[str]
    brand_names: list[str]
    titles: list[str]
    complements: list[list[int]]  # category -> complement categories
    similar: list[list[int]]  # item -> similar items (most likely first)
    complement_items: list[list[int]]  # item -> complement items (most likely first)


def _category_names(count: int) -> list[str]:
    names = [name for pair in _CATEGORY_PAIRS for name in pair][:count]
    names += [f"category_{index:03d}" for index in range(len(names), count)]
    return names


def _brand_names(count: int, rng: np.random.Generator) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        length = int(rng.integers(2, 4))
        name = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), size=length)).capitalize()
        if name in seen:
            name = f"{name}{len(names)}"
        seen.add(name)
        names.append(name)
    return names


def _titles(
    config: SyntheticConfig,
    category: np.ndarray,
    brand: np.ndarray,
    popularity: np.ndarray,
    category_names: list[str],
    brand_names: list[str],
) -> list[str]:
    """One title per item: brand, category descriptor word, category name, popularity-tier appeal
    word (noisy), model code. Uses its own Generator (seeded from ``config.seed``), so the main
    stream, and with it every interaction, is untouched."""
    rng = np.random.default_rng([config.seed, _TITLE_STREAM])
    num_items = config.num_items
    descriptors = [
        [
            "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), size=3))
            for _ in range(_CATEGORY_WORDS)
        ]
        for _ in range(config.num_categories)
    ]
    # Tier by popularity rank: the top 5%, the next 20%, the next 35%, the rest.
    rank = np.empty(num_items, dtype=np.int64)
    rank[np.argsort(-popularity, kind="stable")] = np.arange(num_items)
    tier = np.searchsorted(np.array([0.05, 0.25, 0.6]) * num_items, rank, side="right")
    noisy = rng.random(num_items) < _TIER_NOISE
    tier = np.where(noisy, rng.integers(0, len(_TIER_WORDS), num_items), tier)
    appeal = rng.integers(0, len(_TIER_WORDS[0]), num_items)
    descriptor = rng.integers(0, _CATEGORY_WORDS, num_items)
    return [
        f"{brand_names[b]} {appeal_word} {descriptors[c][d]} {category_names[c].replace('_', ' ')} "
        f"{chr(65 + i % 26)}{i % 997 + 1}"
        for i, (b, c, d, appeal_word) in enumerate(
            zip(
                brand.tolist(),
                category.tolist(),
                descriptor.tolist(),
                (_TIER_WORDS[t][a] for t, a in zip(tier.tolist(), appeal.tolist(), strict=True)),
                strict=True,
            )
        )
    ]


def _weighted_sample(rng: np.random.Generator, pool: np.ndarray, weights: np.ndarray, size: int) -> list[int]:
    """Up to ``size`` distinct members of ``pool`` drawn without replacement, proportional to weight."""
    size = min(size, len(pool))
    if size == 0:
        return []
    chosen = rng.choice(pool, size=size, replace=False, p=weights / weights.sum())
    return [int(i) for i in chosen]


def _build_catalog(config: SyntheticConfig, rng: np.random.Generator) -> _Catalog:
    num_items, num_categories = config.num_items, config.num_categories
    category_names = _category_names(num_categories)

    # Complement categories: the paired category first, then one other at random.
    complements: list[list[int]] = []
    for c in range(num_categories):
        partner = c ^ 1 if (c ^ 1) < num_categories else int(rng.integers(0, num_categories - 1))
        others = [o for o in range(num_categories) if o not in (c, partner)]
        extra = [int(rng.choice(others))] if others else []
        complements.append([partner, *extra])

    # Category sizes vary; every category gets at least two items.
    category_share = rng.dirichlet(np.full(num_categories, 2.0))
    category = np.concatenate(
        [
            np.repeat(np.arange(num_categories), 2),
            rng.choice(num_categories, num_items - 2 * num_categories, p=category_share),
        ]
    )
    rng.shuffle(category)

    # Brands belong to categories; within a category some brands are much bigger than others.
    brand_category = np.concatenate(
        [np.arange(num_categories), rng.integers(0, num_categories, config.num_brands - num_categories)]
    )
    brand_names = _brand_names(config.num_brands, rng)
    brand_premium = np.exp(rng.normal(0.0, 0.3, config.num_brands))
    brand = np.empty(num_items, dtype=np.int64)
    for c in range(num_categories):
        members = np.flatnonzero(category == c)
        category_brands = np.flatnonzero(brand_category == c)
        weights = 1.0 / np.arange(1, len(category_brands) + 1) ** 0.8
        brand[members] = rng.choice(category_brands, size=len(members), p=weights / weights.sum())

    median_price = np.exp(rng.uniform(math.log(5.0), math.log(800.0), num_categories))
    price = median_price[category] * brand_premium[brand] * np.exp(rng.normal(0.0, 0.4, num_items))
    price = np.round(np.maximum(price, 0.5), 2)

    popularity = np.empty(num_items)
    popularity[rng.permutation(num_items)] = 1.0 / np.arange(1, num_items + 1) ** config.zipf_exponent

    bid = np.zeros(num_items)
    num_sponsored = (
        max(1, round(config.sponsored_fraction * num_items)) if config.sponsored_fraction > 0 else 0
    )
    sponsored = rng.choice(num_items, size=num_sponsored, replace=False)
    bid[sponsored] = np.round(rng.uniform(0.05, 2.0, num_sponsored), 2)

    titles = _titles(config, category, brand, popularity, category_names, brand_names)

    # Per-item lists: similar items in the same category (same brand favoured), complement items.
    members_of = [np.flatnonzero(category == c) for c in range(num_categories)]
    similar: list[list[int]] = []
    complement_items: list[list[int]] = []
    for item in range(num_items):
        peers = members_of[category[item]]
        peers = peers[peers != item]
        weights = popularity[peers] ** 0.5 * np.where(brand[peers] == brand[item], 3.0, 1.0)
        similar.append(_weighted_sample(rng, peers, weights, config.similar_items))
        complement_pool = np.concatenate([members_of[c] for c in complements[category[item]]])
        complement_items.append(
            _weighted_sample(
                rng, complement_pool, popularity[complement_pool] ** 0.5, config.complement_items
            )
        )
    return _Catalog(
        category,
        brand,
        price,
        bid,
        popularity,
        category_names,
        brand_names,
        titles,
        complements,
        similar,
        complement_items,
    )


class _Uniforms:
    """Buffered uniform draws from a numpy Generator (scalar Generator calls are slow)."""

    def __init__(self, rng: np.random.Generator, buffer: int = 8192):
        self._rng, self._size = rng, buffer
        self._values: list[float] = []
        self._next = 0

    def __call__(self) -> float:
        if self._next >= len(self._values):
            self._values = self._rng.random(self._size).tolist()
            self._next = 0
        value = self._values[self._next]
        self._next += 1
        return value


class _Sampler:
    """Draws proportional to fixed weights by bisection over cumulative sums."""

    def __init__(self, members: list[int], weights: list[float]):
        self.members = members
        self.cumulative = list(accumulate(weights))

    def draw(self, u: float) -> int:
        index = bisect.bisect_right(self.cumulative, u * self.cumulative[-1])
        return self.members[min(index, len(self.members) - 1)]


def _list_weights(length: int) -> list[float]:
    """Rank-decaying weights over a similar/complement list: earlier entries are likelier."""
    return [1.0 / (rank + 1) ** 1.2 for rank in range(length)]


class _Simulator:
    """Users' sessions over a catalog: which item comes next, in which scenario, how deep."""

    def __init__(self, config: SyntheticConfig, catalog: _Catalog, rng: np.random.Generator):
        self.config, self.rng = config, rng
        self.uniform = _Uniforms(rng)
        num_categories = config.num_categories
        category_popularity = np.bincount(
            catalog.category, weights=catalog.popularity, minlength=num_categories
        )
        self.category_popularity = category_popularity / category_popularity.sum()
        self.by_category = [
            _Sampler(members.tolist(), catalog.popularity[members].tolist())
            for members in (np.flatnonzero(catalog.category == c) for c in range(num_categories))
        ]
        self.global_sampler = _Sampler(list(range(config.num_items)), catalog.popularity.tolist())
        sponsored = np.flatnonzero(catalog.bid > 0)
        self.sponsored_sampler = (
            _Sampler(
                sponsored.tolist(), (catalog.bid[sponsored] * catalog.popularity[sponsored] ** 0.5).tolist()
            )
            if len(sponsored)
            else None
        )
        self.similar = [
            _Sampler(items, _list_weights(len(items))) if items else None for items in catalog.similar
        ]
        self.complement = [
            _Sampler(items, _list_weights(len(items))) if items else None
            for items in catalog.complement_items
        ]
        self.item_category = catalog.category.tolist()

    def unseen(self, candidate: int, seen: set[int]) -> int:
        """``candidate`` if new to the user, else a popularity draw from its category, else from
        the whole catalog, else the next new item by id."""
        if candidate not in seen:
            return candidate
        fallback = self.by_category[self.item_category[candidate]]
        for sampler in (fallback, self.global_sampler):
            for _ in range(8):
                redraw = sampler.draw(self.uniform())
                if redraw not in seen:
                    return redraw
        num_items = self.config.num_items
        start = int(self.uniform() * num_items)
        return next((start + k) % num_items for k in range(num_items) if (start + k) % num_items not in seen)

    def session_entry(self, affinity: _Sampler) -> tuple[int, str]:
        """First item of a session: the home feed, a category page, or a sponsored slot."""
        u = self.uniform()
        if u < 0.15 and self.sponsored_sampler is not None:
            # Ads are targeted: a sponsored item in a category the user likes, when one is drawn.
            for _ in range(4):
                candidate = self.sponsored_sampler.draw(self.uniform())
                if self.uniform() < 0.5 or self.item_category[candidate] == affinity.draw(self.uniform()):
                    return candidate, "ads"
            return self.sponsored_sampler.draw(self.uniform()), "ads"
        scenario = "category" if u < 0.45 else "home"
        return self.by_category[affinity.draw(self.uniform())].draw(self.uniform()), scenario

    def next_item(self, item: int, stage: EventType, affinity: _Sampler) -> tuple[int, str]:
        """The next item of a session, given the current item and how far its visit went."""
        config, u = self.config, self.uniform()
        complement, similar = self.complement[item], self.similar[item]
        if stage >= EventType.ADD_TO_CART and complement is not None and u < config.complement_probability:
            return complement.draw(self.uniform()), "cart"
        if stage < EventType.ADD_TO_CART and similar is not None and u < config.similar_probability:
            return similar.draw(self.uniform()), "item_detail"
        if self.uniform() < 0.5:
            return self.by_category[self.item_category[item]].draw(self.uniform()), "category"
        return self.by_category[affinity.draw(self.uniform())].draw(self.uniform()), "home"

    def funnel_stage(self) -> EventType:
        """The deepest funnel step of one item visit."""
        config = self.config
        if self.uniform() >= config.click_rate:
            return EventType.VIEW
        if self.uniform() >= config.cart_rate:
            return EventType.CLICK
        if self.uniform() >= config.purchase_rate:
            return EventType.ADD_TO_CART
        return EventType.PURCHASE

    def user_rows(self, user: int) -> list[tuple[int, int, int, int, str]]:
        """Rows ``(timestamp_ms, user, item, event_type, scenario)`` of one user's sessions."""
        config, rng = self.config, self.rng
        num_categories = config.num_categories
        alpha = np.full(num_categories, config.affinity_concentration)
        extra_events = max(config.mean_events_per_user - config.min_events_per_user, 0.0)
        num_events = config.min_events_per_user + int(rng.geometric(1.0 / (extra_events + 1.0))) - 1
        num_events = min(num_events, config.max_events_per_user)
        affinity = 0.7 * rng.dirichlet(alpha) + 0.3 * self.category_popularity
        time_ms = config.start_time_ms + self.uniform() * config.span_days * 86_400_000 * 0.5
        seen: set[int] = set()
        rows: list[tuple[int, int, int, int, str]] = []
        while len(rows) < num_events:
            if rows:  # a new session, hours to days later; sometimes with a new interest
                time_ms += 3_600_000 + rng.exponential(2 * 86_400_000)
                if self.uniform() < config.affinity_drift:
                    new_interest = int(rng.choice(num_categories, p=self.category_popularity))
                    affinity = 0.5 * affinity
                    affinity[new_interest] += 0.5
            affinity_sampler = _Sampler(list(range(num_categories)), affinity.tolist())
            session_length = min(num_events - len(rows), int(rng.geometric(1.0 / config.mean_session_length)))
            item, stage = -1, EventType.VIEW
            for step in range(session_length):
                if step == 0:
                    item, scenario = self.session_entry(affinity_sampler)
                else:
                    item, scenario = self.next_item(item, stage, affinity_sampler)
                item = self.unseen(item, seen)
                seen.add(item)
                stage = self.funnel_stage()
                rows.append((int(time_ms), user, item, int(stage), scenario))
                time_ms += 2_000 + rng.exponential(45_000)
        return rows


def generate(out_dir: Path, config: SyntheticConfig, progress: bool = False) -> Path:
    """Write ``interactions.csv``, ``items.csv`` and ``generator.json`` into ``out_dir``; return it.

    Files are written to temporary names and renamed, so a folder never holds a half-written log.
    ``progress`` shows a progress bar over users on stderr.
    """
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    catalog = _build_catalog(config, rng)
    simulator = _Simulator(config, catalog, rng)
    users = tqdm(
        range(config.num_users), desc="synthetic users", unit="user", disable=not progress, leave=False
    )
    rows = [row for user in users for row in simulator.user_rows(user)]
    rows.sort(key=lambda row: (row[0], row[1]))

    item_ids = [f"sku-{i:06d}" for i in range(config.num_items)]
    user_ids = [f"user-{u:06d}" for u in range(config.num_users)]
    event_names = {int(e): e.name for e in EventType}

    interactions_tmp = out_dir / f".{INTERACTIONS_FILE}.tmp"
    with interactions_tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["user_id", "item_id", "timestamp", "event_type", "scenario"])
        writer.writerows(
            (user_ids[user], item_ids[item], timestamp, event_names[event], scenario)
            for timestamp, user, item, event, scenario in rows
        )
    items_tmp = out_dir / f".{ITEMS_FILE}.tmp"
    with items_tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["item_id", "category", "brand", "price", "title", "bid"])
        for i in range(config.num_items):
            writer.writerow(
                [
                    item_ids[i],
                    catalog.category_names[catalog.category[i]],
                    catalog.brand_names[catalog.brand[i]],
                    f"{catalog.price[i]:.2f}",
                    catalog.titles[i],
                    f"{catalog.bid[i]:.2f}",
                ]
            )
    events = np.bincount([row[3] for row in rows], minlength=len(EventType))
    description = {
        "generator": "recsys.data.synthetic",
        "description": __doc__.split("\n\n")[0],
        "config": asdict(config),
        "counts": {
            "users": config.num_users,
            "items": config.num_items,
            "interactions": len(rows),
            "sponsored_items": int((catalog.bid > 0).sum()),
            "event_types": {EventType(e).name: int(events[e]) for e in range(1, len(EventType))},
        },
        "complement_categories": {
            catalog.category_names[c]: [catalog.category_names[o] for o in others]
            for c, others in enumerate(catalog.complements)
        },
        "files": [INTERACTIONS_FILE, ITEMS_FILE],
    }
    description_tmp = out_dir / f".{GENERATOR_FILE}.tmp"
    description_tmp.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    interactions_tmp.replace(out_dir / INTERACTIONS_FILE)
    items_tmp.replace(out_dir / ITEMS_FILE)
    description_tmp.replace(out_dir / GENERATOR_FILE)
    return out_dir


def read_generator_config(folder: Path) -> SyntheticConfig | None:
    """The config recorded in ``folder/generator.json``, or None when absent or unreadable."""
    path = Path(folder) / GENERATOR_FILE
    try:
        return SyntheticConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
