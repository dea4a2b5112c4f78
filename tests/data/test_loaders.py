"""Loaders: S3-Rec (Amazon Beauty and a folder without attributes), CSV/Parquet, id maps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from recsys.data.dataset import DEFAULT_SCENARIOS, EventType, IdMap
from recsys.data.loaders import (
    DatasetFormatError,
    load_csv,
    load_dataset,
    load_id_maps,
    load_s3rec,
    price_buckets,
    save_id_maps,
)


@pytest.fixture(scope="module")
def beauty(beauty_dir: Path):
    return load_dataset(beauty_dir)


def test_beauty_counts(beauty) -> None:
    assert beauty.name == "beauty"
    assert beauty.num_users == 22_363
    assert beauty.num_items == 12_101
    assert beauty.num_interactions == 198_502
    assert len(beauty.catalog.attribute_names) == 637
    lengths = [len(s) for s in beauty.sequences]
    assert min(lengths) == 5 and max(lengths) == 204


def test_beauty_keeps_external_ids_and_order(beauty, beauty_dir: Path) -> None:
    first_line = (beauty_dir / "Beauty.txt").open(encoding="utf-8").readline().split()
    assert beauty.users.external(0) == first_line[0]
    assert beauty.items.external_many(beauty.sequences[0]) == first_line[1:]
    attributes = json.loads((beauty_dir / "Beauty_item2attributes.json").read_text())
    item = first_line[1]
    bag = beauty.catalog.attributes[beauty.items.dense(item)]
    assert sorted(beauty.catalog.attribute_names[a] for a in bag) == sorted(str(a) for a in attributes[item])
    # ~3.7 attributes per item, as the data README says
    assert 3.5 < np.mean([len(b) for b in beauty.catalog.attributes]) < 3.9
    assert beauty.event_types is None and beauty.events_of(0).tolist() == [EventType.VIEW] * len(
        first_line[1:]
    )


def test_s3rec_folder_without_attributes(tmp_path: Path) -> None:
    (tmp_path / "Shop.txt").write_text("u1 10 2 3\nu2 2 10\n\nu3 7\n", encoding="utf-8")
    dataset = load_dataset(tmp_path)
    assert dataset.name == "shop"
    assert dataset.users.ids == ["u1", "u2", "u3"]
    assert dataset.items.ids == ["2", "3", "7", "10"]  # natural (numeric) order
    assert [dataset.items.external_many(s) for s in dataset.sequences] == [
        ["10", "2", "3"],
        ["2", "10"],
        ["7"],
    ]
    assert dataset.catalog.attribute_names == []
    assert all(len(bag) == 0 for bag in dataset.catalog.attributes)
    assert len(dataset.catalog.attributes) == dataset.num_items


def test_s3rec_attribute_only_items_join_the_catalog(tmp_path: Path) -> None:
    (tmp_path / "Shop.txt").write_text("a 1 2\n", encoding="utf-8")
    (tmp_path / "Shop_item2attributes.json").write_text(json.dumps({"1": [5, 6], "9": [6]}))
    dataset = load_s3rec(tmp_path)
    assert dataset.items.ids == ["1", "2", "9"]
    assert dataset.catalog.attribute_names == ["5", "6"]
    assert [b.tolist() for b in dataset.catalog.attributes] == [[0, 1], [], [1]]


def test_s3rec_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="no dataset found"):
        load_dataset(tmp_path)
    (tmp_path / "A.txt").write_text("u 1\n")
    (tmp_path / "B.txt").write_text("u 1\n")
    with pytest.raises(DatasetFormatError, match="several S3-Rec sequence files"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path / "B.txt").name == "b"
    (tmp_path / "C.txt").write_text("lonely-user\n")
    with pytest.raises(DatasetFormatError, match=r"C.txt:1"):
        load_s3rec(tmp_path, "C")
    with pytest.raises(DatasetFormatError, match="no such"):
        load_dataset(tmp_path / "missing")


def test_s3rec_ignores_id_map_files(beauty_dir: Path, tmp_path: Path) -> None:
    shutil.copy(beauty_dir / "Beauty.txt", tmp_path / "Beauty.txt")
    (tmp_path / "users.txt").write_text("x\n")
    (tmp_path / "items.txt").write_text("y\n")
    dataset = load_dataset(tmp_path)
    assert dataset.name == "beauty" and dataset.num_items == 12_101
    assert all(len(bag) == 0 for bag in dataset.catalog.attributes)


INTERACTIONS = """user_id,item_id,timestamp,event_type,scenario
u2,B,30,click,home
u1,A,20,VIEW,home
u1,C,10,purchase,cart
u2,A,30,add_to_cart,live_stream
u1,B,20,2,
u3,D,5,,category
"""

ITEMS = """item_id,category,brand,price,title,bid
A,phone,Acme,100.0,Acme phone,0.5
B,phone_case,Acme,10.0,Acme case,
C,phone,Zed,,Zed phone,0
E,laptop,,900,Unsold laptop,1.25
"""


def test_csv_orders_each_user_by_time_then_file_order(tmp_path: Path) -> None:
    (tmp_path / "interactions.csv").write_text(INTERACTIONS)
    dataset = load_csv(tmp_path)
    assert dataset.name == tmp_path.name.lower()
    assert dataset.users.ids == ["u2", "u1", "u3"]
    sequences = {
        dataset.users.external(u): dataset.items.external_many(s) for u, s in enumerate(dataset.sequences)
    }
    # u1: C@10, then A@20 and B@20 in file order; u2: B@30 then A@30 in file order.
    assert sequences == {"u1": ["C", "A", "B"], "u2": ["B", "A"], "u3": ["D"]}
    u1 = dataset.users.dense("u1")
    assert dataset.timestamps[u1].tolist() == [10, 20, 20]
    assert dataset.event_types[u1].tolist() == [EventType.PURCHASE, EventType.VIEW, EventType.CLICK]
    u2 = dataset.users.dense("u2")
    assert dataset.event_types[u2].tolist() == [EventType.CLICK, EventType.ADD_TO_CART]
    # Unknown scenarios come after the defaults; an empty scenario is the first default.
    assert dataset.scenario_names == [*DEFAULT_SCENARIOS, "live_stream"]
    names = dataset.scenario_names
    assert [names[s] for s in dataset.scenarios[u1]] == ["cart", "home", "home"]
    assert [names[s] for s in dataset.scenarios[u2]] == ["home", "live_stream"]
    # An empty event type reads as VIEW.
    assert dataset.event_types[dataset.users.dense("u3")].tolist() == [EventType.VIEW]
    # Without an items file: no categories, empty attribute bags.
    assert dataset.catalog.category is None and all(len(b) == 0 for b in dataset.catalog.attributes)


def test_csv_with_items_builds_typed_attributes(tmp_path: Path) -> None:
    (tmp_path / "interactions.csv").write_text(INTERACTIONS)
    (tmp_path / "items.csv").write_text(ITEMS)
    dataset = load_dataset(tmp_path)
    # Catalog order first (E has no interactions but is part of the catalog), then new items.
    assert dataset.items.ids == ["A", "B", "C", "E", "D"]
    catalog = dataset.catalog
    assert catalog.category_names == ["phone", "phone_case", "laptop"]
    assert catalog.category.tolist() == [0, 1, 0, 2, -1]
    assert catalog.brand_names == ["Acme", "Zed"]
    assert catalog.brand.tolist() == [0, 0, 1, -1, -1]
    assert np.isnan(catalog.price[2]) and np.isnan(catalog.price[4])
    assert catalog.price[[0, 1, 3]].tolist() == [100.0, 10.0, 900.0]
    assert catalog.bid.tolist() == [0.5, 0.0, 0.0, 1.25, 0.0]
    assert catalog.title[:4] == ["Acme phone", "Acme case", "Zed phone", "Unsold laptop"]
    assert catalog.title[4] == ""

    def tokens(item: str) -> list[str]:
        return [catalog.attribute_names[a] for a in catalog.attributes[dataset.items.dense(item)]]

    assert tokens("A")[:2] == ["category=phone", "brand=Acme"]
    assert tokens("A")[2].startswith("price_bucket=")
    assert tokens("C") == ["category=phone", "brand=Zed"]  # no price, no bucket
    assert tokens("D") == []
    buckets = {t for item in "ABE" for t in tokens(item) if t.startswith("price_bucket=")}
    assert len(buckets) == 3  # three distinct prices, three quantile buckets


def test_price_buckets_are_quantiles() -> None:
    prices = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, np.nan], dtype=np.float32)
    buckets = price_buckets(prices, num_buckets=5)
    assert buckets.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1]
    assert price_buckets(np.array([np.nan], dtype=np.float32)).tolist() == [-1]


def test_parquet_matches_csv(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "interactions.csv").write_text(INTERACTIONS)
    (tmp_path / "items.csv").write_text(ITEMS)
    from_csv = load_dataset(tmp_path, name="shop")

    parquet_dir = tmp_path / "parquet"
    parquet_dir.mkdir()
    interactions = pa.table(
        {
            "user_id": ["u2", "u1", "u1", "u2", "u1", "u3"],
            "item_id": ["B", "A", "C", "A", "B", "D"],
            "timestamp": pa.array([30, 20, 10, 30, 20, 5], pa.int64()),
            "event_type": ["click", "VIEW", "purchase", "add_to_cart", "2", None],
            "scenario": ["home", "home", "cart", "live_stream", None, "category"],
        }
    )
    items = pa.table(
        {
            "item_id": ["A", "B", "C", "E"],
            "category": ["phone", "phone_case", "phone", "laptop"],
            "brand": ["Acme", "Acme", "Zed", None],
            "price": [100.0, 10.0, None, 900.0],
            "title": ["Acme phone", "Acme case", "Zed phone", "Unsold laptop"],
            "bid": [0.5, None, 0.0, 1.25],
        }
    )
    pq.write_table(interactions, parquet_dir / "interactions.parquet")
    pq.write_table(items, parquet_dir / "items.parquet")
    from_parquet = load_dataset(parquet_dir, name="shop")
    assert from_parquet.fingerprint() == from_csv.fingerprint()
    assert from_parquet.catalog.attribute_names == from_csv.catalog.attribute_names
    for left, right in zip(from_parquet.event_types, from_csv.event_types, strict=True):
        assert left.tolist() == right.tolist()
    for left, right in zip(from_parquet.scenarios, from_csv.scenarios, strict=True):
        assert left.tolist() == right.tolist()


def test_csv_iso_timestamps_and_file_path(tmp_path: Path) -> None:
    path = tmp_path / "retail.csv"
    path.write_text("user_id,item_id,timestamp\nu,b,2024-01-02T00:00:00+00:00\nu,a,2024-01-01T00:00:00\n")
    dataset = load_dataset(path)
    assert dataset.name == "retail"
    assert dataset.items.external_many(dataset.sequences[0]) == ["a", "b"]
    assert dataset.timestamps[0].tolist() == [1_704_067_200_000, 1_704_153_600_000]
    assert dataset.event_types is None and dataset.scenarios is None


def test_parquet_timestamp_columns_become_epoch_milliseconds(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    stamps = pa.array([1_704_153_600_000, 1_704_067_200_000], pa.timestamp("ms", tz="UTC"))
    table = pa.table({"user_id": ["u", "u"], "item_id": ["b", "a"], "timestamp": stamps})
    pq.write_table(table, tmp_path / "interactions.parquet")
    dataset = load_dataset(tmp_path)
    assert dataset.items.external_many(dataset.sequences[0]) == ["a", "b"]
    assert dataset.timestamps[0].tolist() == [1_704_067_200_000, 1_704_153_600_000]


def test_csv_name_from_artifacts_data_folder(tmp_path: Path) -> None:
    folder = tmp_path / "Shop" / "data"
    folder.mkdir(parents=True)
    (folder / "interactions.csv").write_text(INTERACTIONS)
    assert load_dataset(folder).name == "shop"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("user_id,item_id\nu,a\n", "missing column"),
        ("user_id,item_id,timestamp\n", "no interactions"),
        ("user_id,item_id,timestamp\nu,a,yesterday\n", "bad timestamp"),
        ("user_id,item_id,timestamp,event_type\nu,a,1,like\n", "unknown event_type"),
        ("user_id,item_id,timestamp\nu,a\n", "data row 1: expected 3 fields"),
        ("user_id,item_id,timestamp\n,a,1\n", "empty user_id"),
        ('user_id,item_id,timestamp\nu,"a\nb",1\n', "line breaks"),
    ],
)
def test_csv_errors_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "interactions.csv").write_text(content)
    with pytest.raises(DatasetFormatError, match=message):
        load_dataset(tmp_path)


def test_id_maps_round_trip(tmp_path: Path) -> None:
    (tmp_path / "interactions.csv").write_text(INTERACTIONS)
    (tmp_path / "items.csv").write_text(ITEMS)
    dataset = load_dataset(tmp_path)
    save_id_maps(dataset, tmp_path / "bundle")
    users, items = load_id_maps(tmp_path / "bundle")
    assert users == dataset.users and items == dataset.items
    assert (tmp_path / "bundle" / "items.txt").read_text().splitlines() == ["A", "B", "C", "E", "D"]
    assert items.dense_many(["E", "missing"]).tolist() == [3, -1]
    assert isinstance(users, IdMap) and users.external_many([2, 0]) == ["u3", "u2"]
