"""Ranker item ids fixed to the recall model's item vectors (``pretrained_item_ids``): the vectors
go in scaled, stay fixed while the gain and the rest learn, and the exported graphs and the
checkpoint carry the same scores."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rank_service.features import candidate_features, history_inputs, pack_batch
from rank_service.runtime import RankRuntime
from tests.rank.conftest import randomized_ranker
from tests.rank.test_export_parity import TOLERANCE_FP32, make_query, torch_scores


def frozen_ranker(num_items: int = 60):
    """A randomized ranker whose id embeddings are fixed item vectors (and a gain of 1.7)."""
    from rank_service.model import Ranker

    base = randomized_ranker(num_items=num_items)
    model = Ranker(
        replace(base.config, frozen_item_ids=True), base.item_attributes.numpy(), base.item_popularity.numpy()
    )
    state = {k: v for k, v in base.state_dict().items() if k != "item_embedding.weight"}
    model.load_state_dict(state, strict=False)
    vectors = np.random.default_rng(1).normal(size=(num_items, model.config.dim)).astype(np.float32)
    model.set_item_vectors(vectors)
    with torch.no_grad():
        model.item_gain.fill_(1.7)
    return model.eval(), vectors


def test_item_vectors_go_in_scaled_and_stay_fixed_while_the_gain_learns():
    model, vectors = frozen_ranker()
    ids = model.item_embedding.weight.detach().numpy()
    assert np.all(ids[0] == 0)  # padding
    cosine = (ids[1:] * vectors).sum(1) / np.linalg.norm(ids[1:], axis=1) / np.linalg.norm(vectors, axis=1)
    assert np.allclose(cosine, 1.0, atol=1e-5)
    assert np.sqrt(np.mean(ids[1:] ** 2)) == pytest.approx(0.02, rel=1e-4)

    model.train()
    before = model.item_embedding.weight.detach().clone()
    gain = float(model.item_gain.detach())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    query = make_query(np.random.default_rng(2), 5, 20)
    batch = pack_batch(
        [history_inputs(query.history, query.event_types, model.config.max_history)],
        [query.scenario],
        [query.candidates],
        [candidate_features(query.recall_scores, query.source_scores, query.source_mask)],
    )
    scores = model(*(torch.from_numpy(v) for v in batch.feeds().values()))[0]
    scores.logsumexp(-1).sum().backward()
    optimizer.step()
    assert model.item_embedding.weight.grad is None
    assert torch.equal(model.item_embedding.weight, before)
    assert float(model.item_gain) != gain


def test_vectors_of_another_shape_are_refused():
    model, _ = frozen_ranker()
    with pytest.raises(ValueError, match="the ranker needs"):
        model.set_item_vectors(np.zeros((10, model.config.dim), np.float32))


def test_exported_graph_and_checkpoint_score_like_the_torch_model(tmp_path: Path):
    from rank_service.export import checkpoint_path, export_bundle, load_checkpoint, save_checkpoint
    from recsys.data.dataset import DEFAULT_SCENARIOS, IdMap

    model, _ = frozen_ranker()
    items = IdMap(f"item-{i}" for i in range(model.config.num_items))
    export_bundle(model, tmp_path, items, list(DEFAULT_SCENARIOS), "test-fingerprint")
    runtime = RankRuntime.load(tmp_path, device="cpu", threads=1)
    rng = np.random.default_rng(3)
    queries = [make_query(rng, length, 15) for length in (0, 4, 12)]
    expected = torch_scores(model, runtime, queries)
    for got, want in zip(runtime.score(queries), expected, strict=True):
        assert np.allclose(got, want, atol=TOLERANCE_FP32)
    save_checkpoint(model, checkpoint_path(tmp_path), items, list(DEFAULT_SCENARIOS), data_fingerprint="x")
    restored = load_checkpoint(checkpoint_path(tmp_path))[0].eval()
    assert restored.config.frozen_item_ids and float(restored.item_gain) == pytest.approx(1.7)
    for got, want in zip(torch_scores(restored, runtime, queries), expected, strict=True):
        assert np.allclose(got, want, atol=1e-6)


def test_training_with_pretrained_item_ids_records_it(synthetic_dataset, recall_bundle, tmp_path: Path):
    from rank_service.train import RankTrainConfig, build_bundle

    config = replace(RankTrainConfig.tiny(), pretrained_item_ids=True, epochs=1)
    bundle = build_bundle(synthetic_dataset, recall_bundle, tmp_path / "rank", config)
    train = json.loads((bundle / "manifest.json").read_text())["train"]
    assert train["config"]["pretrained_item_ids"] is True
