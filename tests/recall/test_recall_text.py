"""Item text in the item tower: the hashing tokenizer, cold items, titles absent, the sentence path."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from recall_service.model import TwoTowerModel  # noqa: E402
from recall_service.text import HashedTitles, title_features, title_tokens  # noqa: E402
from recall_service.text_eval import choose_cold_items, without_cold_interactions  # noqa: E402
from recall_service.train import RecallTrainConfig, item_text_arrays, train_model  # noqa: E402


def _tiny(**changes) -> RecallTrainConfig:
    return replace(RecallTrainConfig.tiny(), epochs=1, threads=1, **changes)


def test_hashed_features_are_fixed_and_case_insensitive() -> None:
    assert title_features("Acme Phone") == [
        "w:acme", "t:#ac", "t:acm", "t:cme", "t:me#",
        "w:phone", "t:#ph", "t:pho", "t:hon", "t:one", "t:ne#",
    ]  # fmt: skip
    # CRC-32 buckets: the same in every process and Python version (no salted hash()).
    expected = [23007, 15210, 11585, 23699, 7988, 30160, 49650, 23777, 2168, 63028, 41325]
    assert title_tokens("Acme Phone").tolist() == expected
    assert title_tokens("  acme, PHONE!").tolist() == expected
    assert title_tokens("phone phone").tolist() == title_tokens("phone").tolist()  # distinct features


def test_hashed_titles_csr_rows_follow_item_ids() -> None:
    hashed = HashedTitles.build(["a b", "", "b"], buckets=97)
    rows = [hashed.token_ids[hashed.offsets[i] : hashed.offsets[i + 1]] for i in range(4)]
    assert len(hashed.offsets) == 5 and len(rows[0]) == 0 and len(rows[2]) == 0  # padding, no title
    assert set(rows[3]) <= set(rows[1])


def _grouped_dataset(make_dataset):
    """Items 0-19 titled 'red apple fruit', 20-39 'steel hammer tool'; each user stays in one
    group; items 0 and 20 never occur (cold)."""
    rng = np.random.default_rng(0)
    sequences = []
    for user in range(120):
        group = np.arange(1, 20) + (20 if user % 2 else 0)
        sequences.append(rng.choice(group, size=8, replace=False).tolist())
    dataset = make_dataset(sequences, 40)
    titles = [f"red apple fruit r{i}" if i < 20 else f"steel hammer tool s{i}" for i in range(40)]
    return replace(dataset, catalog=replace(dataset.catalog, title=titles))


def test_cold_item_with_text_lands_beside_items_sharing_its_words(make_dataset) -> None:
    dataset = _grouped_dataset(make_dataset)
    config = replace(
        RecallTrainConfig.tiny(), epochs=10, threads=1, patience=20, text_buckets=4096, use_attributes=False
    )
    model = train_model(dataset, config).model
    assert model.shape.text == "hash" and model.shape.mask_unseen_ids
    with torch.no_grad():
        vectors = model.all_item_vectors().numpy()
        # the unseen items' id embeddings take no part
        assert model.id_mask[1, 0] == 0 and model.id_mask[21, 0] == 0 and model.id_mask[2, 0] == 1
    for cold, own, other in ((0, range(1, 20), range(21, 40)), (20, range(21, 40), range(1, 20))):
        similarity = vectors[list(own) + list(other)] @ vectors[cold]
        assert similarity[:19].mean() > similarity[19:].mean() + 0.2
        assert (np.argsort(-similarity)[:10] < 19).all()  # its 10 nearest items share its words


def test_titles_absent_or_text_off_train_the_same_model(synthetic_dataset) -> None:
    untitled = replace(synthetic_dataset, catalog=replace(synthetic_dataset.catalog, title=None))
    without = train_model(untitled, _tiny()).model
    off = train_model(synthetic_dataset, _tiny(text="off")).model
    assert without.text is None and off.text is None
    assert not any(k.startswith("text.") or k == "id_mask" for k in without.state_dict())
    for key, value in without.state_dict().items():
        torch.testing.assert_close(off.state_dict()[key], value, rtol=0, atol=0)
    with_text = train_model(synthetic_dataset, _tiny()).model
    assert with_text.shape.text == "hash" and "text.bag.weight" in with_text.state_dict()


def test_text_model_round_trips_through_its_state_dict(synthetic_dataset) -> None:
    model = train_model(synthetic_dataset, _tiny()).model
    again = TwoTowerModel.from_state_dict(model.shape, model.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(again.all_item_vectors(), model.all_item_vectors())
        with model.frozen_text():  # the export's constant table computes the same numbers
            frozen = model.all_item_vectors()
        torch.testing.assert_close(frozen, again.all_item_vectors())


def test_text_hash_without_titles_is_an_error(synthetic_dataset) -> None:
    untitled = replace(synthetic_dataset, catalog=replace(synthetic_dataset.catalog, title=None))
    with pytest.raises(ValueError, match="no item has a title"):
        item_text_arrays(untitled, _tiny(text="hash"))
    with pytest.raises(ValueError, match="text must be one of"):
        item_text_arrays(synthetic_dataset, _tiny(text="bert"))


def test_sentence_model_path_must_exist_and_package_is_named(
    synthetic_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError, match="no local sentence-embedding model"):
        item_text_arrays(synthetic_dataset, _tiny(text_model=str(tmp_path / "missing")))
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    with pytest.raises(RuntimeError, match="'sentence-transformers' package"):
        item_text_arrays(synthetic_dataset, _tiny(text_model=str(tmp_path)))


def test_sentence_vectors_are_projected_into_the_tower(synthetic_dataset) -> None:
    titles = synthetic_dataset.catalog.title
    catalog = replace(synthetic_dataset.catalog, title=["", *titles[1:]])  # item 0 has no title
    dataset = replace(synthetic_dataset, catalog=catalog)

    def fake_encoder(texts: list[str]) -> np.ndarray:
        return np.asarray([[len(t), t.count(" "), 1.0] for t in texts], dtype=np.float32)

    model = train_model(dataset, _tiny(text_model="local-model"), text_encoder=fake_encoder).model
    assert model.shape.text == "sentence" and model.shape.text_input_dim == 3
    with torch.no_grad():
        table = model.text_table()
    assert table.shape == (dataset.num_items + 1, model.shape.dim)
    assert torch.all(table[:2] == 0) and torch.all(table[2:].abs().sum(dim=1) > 0)
    assert "text.projection.weight" in model.state_dict()


def test_cold_split_keeps_only_test_interactions_of_cold_items(synthetic_dataset) -> None:
    cold = choose_cold_items(synthetic_dataset, 0.1, seed=7)
    assert len(cold) == 20
    dataset = without_cold_interactions(synthetic_dataset, cold)
    for sequence, events in zip(dataset.sequences, dataset.event_types, strict=True):
        assert len(sequence) == len(events)
        assert not np.isin(sequence[:-1], cold).any()
    tests = np.array([s[-1] for s in dataset.sequences])
    assert np.isin(tests, cold).any()


def test_unseen_items_are_never_training_negatives() -> None:
    import torch.nn.functional as F

    from recall_service.model import TwoTowerShape
    from recall_service.train import SampledSoftmaxLoss

    torch.manual_seed(0)
    shape = TwoTowerShape(num_items=30, num_attributes=3, max_attributes=1, num_scenarios=1, dim=8, layers=1)
    model = TwoTowerModel(shape, np.zeros((31, 1), dtype=np.int64)).eval()
    users = F.normalize(torch.randn(5, 8), dim=-1)
    positives = torch.tensor([1, 4, 4, 9, 30])
    counts = np.ones(30)
    counts[10:20] = 0  # items 11-20 (+1 ids) have no interactions
    seen = torch.as_tensor(counts > 0)
    full = SampledSoftmaxLoss(counts, uniform_negatives=30, rng=np.random.default_rng(0), seen_only=True)
    logits = model.item_logits(users, torch.arange(1, 31))[:, seen]
    labels = torch.searchsorted(torch.nonzero(seen).flatten(), positives - 1)
    torch.testing.assert_close(full(model, users, positives), F.cross_entropy(logits, labels))
