"""Rank test fixtures: an untrained ranker exported to a bundle (parity and runtime tests)."""

from __future__ import annotations

import numpy as np
import pytest


def randomized_ranker(num_items: int = 60, max_history: int = 12, seed: int = 0, mlp_width: int = 0):
    """An untrained ranker with weights large enough that scores differ clearly per input."""
    import torch

    from rank_service.model import Ranker, RankerConfig

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = RankerConfig(
        num_items=num_items,
        num_attributes=10,
        num_scenarios=5,
        max_history=max_history,
        max_attributes=3,
        dim=32,
        heads=4,
        layers=2,
        dropout=0.0,
        mlp_width=mlp_width,
    )
    attributes = np.where(rng.random((num_items + 1, 3)) < 0.6, rng.integers(1, 11, (num_items + 1, 3)), 0)
    attributes[0] = 0
    model = Ranker(config, attributes, rng.random(num_items + 1).astype(np.float32))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory):
    """(model, bundle dir) of an untrained ranker exported with export_bundle (both graphs)."""
    from rank_service.export import export_bundle
    from recsys.data.dataset import DEFAULT_SCENARIOS, IdMap

    model = randomized_ranker()
    bundle_dir = tmp_path_factory.mktemp("random-rank-bundle")
    items = IdMap(f"item-{i}" for i in range(model.config.num_items))
    export_bundle(model, bundle_dir, items, list(DEFAULT_SCENARIOS), "test-fingerprint")
    return model, bundle_dir
