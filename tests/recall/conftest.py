"""Fixtures of the recall tests: a hand-made dataset and the engine over the shared tiny bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.data.dataset import Dataset, IdMap, ItemCatalog


def _make_dataset(
    sequences: list[list[int]],
    num_items: int,
    categories: list[int] | None = None,
    bids: list[float] | None = None,
) -> Dataset:
    """A small dataset from dense-id sequences; item i is ``"i{i}"`` with attribute bag [i % 3]."""
    catalog = ItemCatalog(
        attributes=[np.array([i % 3], dtype=np.int64) for i in range(num_items)],
        attribute_names=["a0", "a1", "a2"],
        category=None if categories is None else np.asarray(categories, dtype=np.int64),
        category_names=[] if categories is None else [f"c{c}" for c in range(max(categories) + 1)],
        bid=None if bids is None else np.asarray(bids, dtype=np.float32),
    )
    return Dataset(
        name="handmade",
        users=IdMap(f"u{u}" for u in range(len(sequences))),
        items=IdMap(f"i{i}" for i in range(num_items)),
        sequences=[np.asarray(s, dtype=np.int64) for s in sequences],
        catalog=catalog,
    )


def six_item_model(similarity: str = "dot"):
    """A one-layer two-tower model over 6 items with 0-3 attributes each (item 4 has none)."""
    import torch

    from recall_service.model import TwoTowerModel, TwoTowerShape

    torch.manual_seed(0)
    attributes = np.array([[0, 0, 0], [1, 2, 0], [2, 0, 0], [3, 4, 1], [0, 0, 0], [4, 4, 2], [2, 3, 0]])
    shape = TwoTowerShape(
        num_items=6,
        num_attributes=4,
        max_attributes=3,
        num_scenarios=1,
        dim=8,
        layers=1,
        similarity=similarity,
    )
    return TwoTowerModel(shape, attributes)


@pytest.fixture(scope="session")
def recall_engine(recall_bundle: Path):
    from recall_service.engine import RecallEngine

    return RecallEngine.load(recall_bundle, device="cpu", threads=1)


@pytest.fixture(scope="session")
def make_dataset():
    """Factory: ``make_dataset(sequences, num_items, categories=None, bids=None) -> Dataset``."""
    return _make_dataset
