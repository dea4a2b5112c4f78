"""A ranker without item id embeddings (``item_ids=False``): items are their attributes, so two
items with the same attributes and recall features score alike, wherever they appear."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from rank_service.features import SOURCES, candidate_features, history_inputs, pack_batch
from tests.rank.conftest import randomized_ranker


def _scores(model, history: np.ndarray, candidates: np.ndarray, features: np.ndarray) -> np.ndarray:
    batch = pack_batch(
        [history_inputs(history, None, model.config.max_history)], [0], [candidates], [features]
    )
    with torch.no_grad():
        return model(*(torch.from_numpy(v) for v in batch.feeds().values()))[0].numpy()[0]


def test_items_with_the_same_attributes_and_features_score_alike_without_ids() -> None:
    from rank_service.model import Ranker

    base = randomized_ranker()
    attributes = base.item_attributes.numpy().copy()
    attributes[7] = attributes[3]  # items 6 and 2 (model ids 7 and 3): the same attributes
    popularity = base.item_popularity.numpy().copy()
    popularity[7] = popularity[3]
    with_ids = Ranker(base.config, attributes, popularity)
    with_ids.load_state_dict(
        {k: v for k, v in base.state_dict().items() if k not in ("item_attributes", "item_popularity")},
        strict=False,
    )
    without_ids = Ranker(replace(base.config, item_ids=False), attributes, popularity)
    without_ids.load_state_dict(with_ids.state_dict())
    with_ids.eval(), without_ids.eval()
    candidates = np.array([2, 6, 11])
    sources = len(SOURCES)
    same = candidate_features(
        np.ones(3, np.float32), np.zeros((3, sources), np.float32), np.zeros((3, sources), bool)
    )
    history = np.array([1, 4, 9])
    plain = _scores(with_ids, history, candidates, same)
    attributes_only = _scores(without_ids, history, candidates, same)
    assert abs(plain[0] - plain[1]) > 1e-3  # the ids tell them apart
    assert abs(attributes_only[0] - attributes_only[1]) < 1e-5  # nothing else does
    assert abs(attributes_only[0] - attributes_only[2]) > 1e-3  # other attributes still count
    # the item table the export freezes has no id part either
    without_ids.freeze_item_table()
    torch.testing.assert_close(without_ids.item_table[7], without_ids.item_table[3])


def test_the_command_line_turns_item_ids_off_and_the_default_keeps_them() -> None:
    from rank_service.train import parse_arguments

    assert parse_arguments([])[1].item_ids is True
    assert parse_arguments(["--no-item-ids"])[1].item_ids is False


def test_without_ids_every_trained_parameter_gets_a_gradient() -> None:
    """DistributedDataParallel waits for a gradient of every trainable parameter: the id table
    nothing reads must not be one."""
    from rank_service.model import Ranker

    base = randomized_ranker()
    model = Ranker(
        replace(base.config, item_ids=False), base.item_attributes.numpy(), base.item_popularity.numpy()
    )
    sources = len(SOURCES)
    features = candidate_features(
        np.ones(3, np.float32), np.zeros((3, sources), np.float32), np.zeros((3, sources), bool)
    )
    batch = pack_batch([history_inputs(np.array([1, 4]), None, 12)], [0], [np.array([2, 6, 11])], [features])
    model.train()
    model(*(torch.from_numpy(v) for v in batch.feeds().values()))[0].logsumexp(-1).sum().backward()
    assert not model.item_embedding.weight.requires_grad
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
