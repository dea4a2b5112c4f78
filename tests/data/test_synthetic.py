"""Synthetic generator: deterministic, realistic in shape, and carrying learnable signal."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recsys.data.dataset import DEFAULT_SCENARIOS, EventType
from recsys.data.loaders import load_dataset
from recsys.data.split import LeaveOneOutSplit
from recsys.data.synthetic import (
    GENERATOR_FILE,
    INTERACTIONS_FILE,
    ITEMS_FILE,
    SyntheticConfig,
    generate,
    read_generator_config,
)
from recsys.evaluation.popularity import evaluate_popularity
from recsys.evaluation.protocol import evaluate_scorer


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path, synthetic_dir: Path) -> None:
    again = generate(tmp_path / "again", SyntheticConfig.tiny())
    for name in (INTERACTIONS_FILE, ITEMS_FILE, GENERATOR_FILE):
        assert (again / name).read_bytes() == (synthetic_dir / name).read_bytes()
    other = generate(tmp_path / "other", SyntheticConfig.tiny(seed=8))
    assert (other / INTERACTIONS_FILE).read_bytes() != (synthetic_dir / INTERACTIONS_FILE).read_bytes()
    assert read_generator_config(synthetic_dir) == SyntheticConfig.tiny()
    assert read_generator_config(tmp_path) is None


def test_tiny_dataset_shape(synthetic_dataset, synthetic_dir: Path) -> None:
    config = SyntheticConfig.tiny()
    assert synthetic_dataset.num_users == config.num_users
    assert synthetic_dataset.num_items == config.num_items
    lengths = np.array([len(s) for s in synthetic_dataset.sequences])
    assert lengths.min() >= config.min_events_per_user  # every user is evaluated
    # A user never revisits an item, so no target sits in its own history.
    assert all(len(np.unique(s)) == len(s) for s in synthetic_dataset.sequences)
    for stamps in synthetic_dataset.timestamps:
        assert np.all(np.diff(stamps) > 0)
    described = json.loads((synthetic_dir / GENERATOR_FILE).read_text())
    assert described["counts"]["interactions"] == synthetic_dataset.num_interactions
    with (synthetic_dir / INTERACTIONS_FILE).open() as handle:
        stamps = [int(row["timestamp"]) for row in csv.DictReader(handle)]
    assert stamps == sorted(stamps)  # a global log in time order


def test_events_follow_the_funnel_and_every_scenario_occurs(synthetic_dataset) -> None:
    events = np.bincount(np.concatenate(synthetic_dataset.event_types), minlength=5)
    view, click, cart, purchase = (int(events[e]) for e in (1, 2, 3, 4))
    assert view > click > cart > purchase > 0
    assert synthetic_dataset.scenario_names == list(DEFAULT_SCENARIOS)
    scenarios = np.bincount(np.concatenate(synthetic_dataset.scenarios), minlength=len(DEFAULT_SCENARIOS))
    assert np.all(scenarios > 0)


def test_catalog_brands_belong_to_categories_and_sponsored_items_bid(synthetic_dataset) -> None:
    catalog = synthetic_dataset.catalog
    config = SyntheticConfig.tiny()
    assert len(catalog.category_names) == config.num_categories
    assert {"phone", "phone_case"} <= set(catalog.category_names)
    brand_categories = {}
    for brand, category in zip(catalog.brand, catalog.category, strict=True):
        assert brand_categories.setdefault(int(brand), int(category)) == int(category)
    assert np.all(catalog.price > 0)
    sponsored = int((catalog.bid > 0).sum())
    assert sponsored == round(config.sponsored_fraction * config.num_items)
    assert all(title for title in catalog.title)
    assert {name.split("=")[0] for name in catalog.attribute_names} == {"category", "brand", "price_bucket"}


def test_popularity_is_long_tailed(synthetic_dataset) -> None:
    counts = np.sort(np.bincount(np.concatenate(synthetic_dataset.sequences)))[::-1]
    top_decile = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_decile > 0.3  # a uniform catalog would give 0.1


def test_cart_events_lead_to_complement_categories(synthetic_dir: Path) -> None:
    dataset = load_dataset(synthetic_dir)
    complements = json.loads((synthetic_dir / GENERATOR_FILE).read_text())["complement_categories"]
    names = dataset.catalog.category_names
    after_cart = complement_hits = 0
    for items, events in zip(dataset.sequences, dataset.event_types, strict=True):
        for previous, following, event in zip(items[:-1], items[1:], events[:-1], strict=True):
            if event >= EventType.ADD_TO_CART:
                after_cart += 1
                previous_category = names[dataset.catalog.category[previous]]
                complement_hits += (
                    names[dataset.catalog.category[following]] in complements[previous_category]
                )
    assert after_cart > 100
    assert complement_hits / after_cart > 0.4  # random categories would give about 2/8


def test_invalid_configs_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_brands"):
        generate(tmp_path, replace(SyntheticConfig.tiny(), num_brands=2))
    with pytest.raises(ValueError, match="click_rate"):
        generate(tmp_path, replace(SyntheticConfig.tiny(), click_rate=1.5))
    with pytest.raises(ValueError, match="preset"):
        SyntheticConfig.preset("huge")
    assert not (tmp_path / INTERACTIONS_FILE).exists()


def _transition_scores(split: LeaveOneOutSplit, num_items: int):
    """Next-item scores from item -> next-item counts in training sequences (ties: popularity)."""
    transitions = np.zeros((num_items, num_items), dtype=np.float32)
    for user in range(split.dataset.num_users):
        sequence = split.train_sequence(user)
        np.add.at(transitions, (sequence[:-1], sequence[1:]), 1.0)
    popularity = split.item_counts_without_test().astype(np.float32)
    tie_break = popularity / (popularity.max() + 1.0)

    def score_users(users: np.ndarray, phase):
        last_items = np.array([split.history(int(u), phase)[-1] for u in users])
        return transitions[last_items] + tie_break[None, :]

    return score_users


def test_next_item_model_beats_popularity(tmp_path: Path) -> None:
    config = replace(
        SyntheticConfig.quick(), num_users=2_000, num_items=1_000, num_categories=16, num_brands=48
    )
    dataset = load_dataset(generate(tmp_path, config))
    split = LeaveOneOutSplit(dataset)
    popularity = evaluate_popularity(dataset, split)
    transitions = evaluate_scorer(_transition_scores(split, dataset.num_items), split)
    assert popularity["HR@10"] > 0.02  # popularity itself is a real baseline here
    assert transitions["HR@10"] >= 2.0 * popularity["HR@10"]
    assert transitions["NDCG@10"] >= 2.0 * popularity["NDCG@10"]


def _drift(dataset) -> float:
    """How much more a user's home-feed categories differ between the first and second half of
    their history than between alternate events (a stationary user scores about 0)."""
    home = dataset.scenario_names.index("home")
    num_categories = len(dataset.catalog.category_names)

    def distance(a: np.ndarray, b: np.ndarray) -> float:
        mix_a, mix_b = (np.bincount(x, minlength=num_categories) / len(x) for x in (a, b))
        return 0.5 * float(np.abs(mix_a - mix_b).sum())

    differences = []
    for items, scenarios in zip(dataset.sequences, dataset.scenarios, strict=True):
        categories = dataset.catalog.category[items[scenarios == home]]
        half = len(categories) // 2
        if half >= 4:
            halves = distance(categories[:half], categories[half : 2 * half])
            alternate = distance(categories[0 : 2 * half : 2], categories[1 : 2 * half : 2])
            differences.append(halves - alternate)
    return float(np.mean(differences))


def test_category_affinities_drift(tmp_path: Path) -> None:
    # Enough items per category that heavy users never exhaust their favourites (another drift).
    base = replace(SyntheticConfig.tiny(), num_users=600, num_items=1000, mean_events_per_user=30.0)
    steady = load_dataset(generate(tmp_path / "steady", replace(base, affinity_drift=0.0)))
    drifting = load_dataset(generate(tmp_path / "drifting", base))
    assert abs(_drift(steady)) < 0.04
    assert _drift(drifting) > max(0.05, _drift(steady) + 0.04)


# sha256 of the tiny preset's interactions.csv and of items.csv without its title column, as
# generated before titles carried signal: titles draw from their own stream and change neither.
TINY_INTERACTIONS_SHA256 = "9879a9dee15671919758259dbaa6c01f95b59ad56b87b8f8e4f67c7da07b49c1"
TINY_ITEMS_WITHOUT_TITLES_SHA256 = "bb5ecff6af553817f35f1d9d2e3109a571f3f940bf954b54cc90746a6a1a623f"


def test_titles_leave_interactions_and_other_columns_unchanged(synthetic_dir: Path) -> None:
    import hashlib

    assert (
        hashlib.sha256((synthetic_dir / INTERACTIONS_FILE).read_bytes()).hexdigest()
        == TINY_INTERACTIONS_SHA256
    )
    with (synthetic_dir / ITEMS_FILE).open(encoding="utf-8") as handle:
        rows = [
            [row[k] for k in ("item_id", "category", "brand", "price", "bid")]
            for row in csv.DictReader(handle)
        ]
    assert hashlib.sha256(repr(rows).encode()).hexdigest() == TINY_ITEMS_WITHOUT_TITLES_SHA256


def test_titles_carry_category_and_popularity_tier(synthetic_dataset) -> None:
    from recsys.data.synthetic import _TIER_WORDS

    catalog = synthetic_dataset.catalog
    counts = np.bincount(np.concatenate(synthetic_dataset.sequences), minlength=synthetic_dataset.num_items)
    top_words, bottom_words = set(_TIER_WORDS[0]), set(_TIER_WORDS[-1])
    order = np.argsort(-counts, kind="stable")
    head, tail = order[: len(order) // 10], order[-len(order) // 2 :]

    def share(items: np.ndarray, words: set[str]) -> float:
        return float(np.mean([bool(words & set(catalog.title[i].lower().split())) for i in items]))

    # The most-visited items mostly say "bestselling/iconic/flagship"; the least-visited rarely do.
    assert share(head, top_words) > 0.4 > 0.1 > share(tail, top_words)
    assert share(tail, bottom_words) > share(head, bottom_words)
    for item in range(synthetic_dataset.num_items):
        name = catalog.category_names[catalog.category[item]].replace("_", " ")
        assert name in catalog.title[item]
