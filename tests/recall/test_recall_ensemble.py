"""A recall ensemble: members trained from their own seeds, served as one wider two-tower model whose
inner product is the sum of the members' scores (recall_service.model.TowerEnsemble)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from recall_service.model import TowerEnsemble, TwoTowerModel, TwoTowerShape  # noqa: E402

SHAPE = TwoTowerShape(
    num_items=30,
    num_attributes=4,
    max_attributes=1,
    num_scenarios=2,
    dim=8,
    layers=1,
    heads=2,
    max_length=6,
    dropout=0.1,
    relative_positions=True,
    post_norm=True,
    similarity="dot",
)


def _members(count: int, shape: TwoTowerShape = SHAPE) -> list[TwoTowerModel]:
    attributes = np.zeros((shape.num_items + 1, 1), dtype=np.int64)
    attributes[1:, 0] = np.arange(shape.num_items) % shape.num_attributes + 1
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        members.append(TwoTowerModel(shape, attributes).eval())
    return members


def test_an_ensembles_score_is_the_sum_of_its_members_scores() -> None:
    members = _members(3)
    ensemble = TowerEnsemble(members).eval()
    items = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4], [0, 0, 0, 9]])
    events = (items > 0).long()
    scenarios = torch.tensor([0, 1, 0])
    with torch.no_grad():
        users = ensemble(items, events, scenarios)
        vectors = ensemble.all_item_vectors()
        expected = sum(m(items, events, scenarios) @ m.all_item_vectors().T for m in members)
    assert users.shape == (3, 3 * SHAPE.dim) and vectors.shape == (SHAPE.num_items, 3 * SHAPE.dim)
    torch.testing.assert_close(users @ vectors.T, expected, rtol=1e-5, atol=1e-5)
    # the members differ (their own seeds): the sum is not one member's score scaled
    with torch.no_grad():
        first, second = (m(items, events, scenarios) for m in members[:2])
    assert (first - second).abs().max() > 1e-3


def test_an_ensemble_needs_two_members_of_one_catalog() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        TowerEnsemble(_members(1))
    other = _members(1, dataclasses.replace(SHAPE, num_items=31))
    with pytest.raises(ValueError, match="share the catalog"):
        TowerEnsemble([_members(1)[0], other[0]])


def test_validation_of_an_ensemble_ranks_by_the_summed_scores(synthetic_dataset) -> None:
    """The early-stopping validator gives the protocol's numbers for the ensemble's summed scores,
    and they are not those of either member alone."""
    from recall_service.train import RecallTrainConfig, RecallValidator, model_attributes, model_shape
    from recsys.data.split import LeaveOneOutSplit
    from recsys.evaluation.protocol import evaluate_scorer

    config = dataclasses.replace(RecallTrainConfig.tiny(), similarity="dot", post_norm=True)
    attributes = model_attributes(synthetic_dataset, config)
    shape = model_shape(synthetic_dataset, config, attributes.shape[1])
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(TwoTowerModel(shape, attributes).eval())
    ensemble = TowerEnsemble(members).eval()
    split = LeaveOneOutSplit(synthetic_dataset)
    validator = RecallValidator(synthetic_dataset, split, split.eval_users, config.max_length, "valid", 64)
    ranks = validator.ranks(ensemble)
    assert not np.array_equal(ranks, validator.ranks(members[0]))

    @torch.no_grad()
    def summed_scores(users: np.ndarray, phase: str) -> np.ndarray:
        from recall_service.train import padded_history

        rows = [
            padded_history(h, synthetic_dataset.events_of(int(u))[: len(h)], config.max_length)
            for u in users
            for h in [split.history(int(u), phase)]
        ]
        items = torch.as_tensor(np.stack([r[0] for r in rows]))
        events = torch.as_tensor(np.stack([r[1] for r in rows]))
        scenarios = torch.as_tensor(
            np.asarray(
                [
                    0
                    if synthetic_dataset.scenarios is None
                    else synthetic_dataset.scenarios[u][len(split.history(u, phase))]
                    for u in users
                ],
                dtype=np.int64,
            )
        )
        return sum((m(items, events, scenarios) @ m.all_item_vectors().T).numpy() for m in members)

    expected = evaluate_scorer(summed_scores, split, "valid", ks=(10, 50))
    assert validator(ensemble, (10, 50)) == pytest.approx(expected, abs=1e-9)


@pytest.fixture(scope="module")
def ensemble_training(synthetic_dataset, tmp_path_factory: pytest.TempPathFactory):
    """Two members trained for two epochs each on the tiny data, saved, reloaded and exported."""
    from recall_service.export import export_bundle
    from recall_service.train import RecallTrainConfig, load_checkpoint, save_checkpoint, train_model

    config = dataclasses.replace(RecallTrainConfig.tiny(), ensemble=2, epochs=2, threads=1)
    result = train_model(synthetic_dataset, config)
    root = tmp_path_factory.mktemp("ensemble")
    save_checkpoint(result, config, root / "recall.pt")
    loaded, _, _ = load_checkpoint(root / "recall.pt")
    bundle = export_bundle(loaded, synthetic_dataset, root / "bundle", config, train_info=result.run)
    return config, result, loaded, bundle


def test_each_member_trains_from_its_own_seed_and_the_run_records_them(ensemble_training) -> None:
    from recall_service.train import ENSEMBLE_SEED_STRIDE

    config, result, _, _ = ensemble_training
    assert isinstance(result.model, TowerEnsemble) and len(result.model.members) == 2
    members = result.run["members"]
    assert [m["seed"] for m in members] == [config.seed, config.seed + ENSEMBLE_SEED_STRIDE]
    assert result.run["ensemble"] == 2 and result.run["seed"] == config.seed
    assert result.run["epochs_run"] == sum(m["epochs_run"] for m in members) == result.epochs_run
    assert result.run["steps"] == sum(m["steps"] for m in members) > 0
    assert result.run["stop_reason"] == "max_epochs"  # two epochs each, still improving
    assert {entry["member"] for entry in result.history} == {0, 1}
    first, second = result.model.members
    assert (first.item_embedding.weight - second.item_embedding.weight).abs().max() > 1e-3


def test_a_saved_ensemble_comes_back_whole_and_exports_one_graph_and_one_index(ensemble_training) -> None:
    from recall_service.index import stored_vectors

    _, result, loaded, bundle = ensemble_training
    assert isinstance(loaded, TowerEnsemble)
    for before, after in zip(result.model.members, loaded.members, strict=True):
        for name, tensor in before.state_dict().items():
            torch.testing.assert_close(after.state_dict()[name], tensor)
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    width = 2 * loaded.shape.dim
    assert manifest["dim"] == width and manifest["ensemble_members"] == 2
    assert manifest["train"]["ensemble"] == 2 and len(manifest["train"]["members"]) == 2
    vectors = np.load(Path(bundle) / "item_vectors.npy")
    index = faiss.read_index(str(Path(bundle) / "index.faiss"))
    assert vectors.shape[1] == index.d == width
    np.testing.assert_array_equal(stored_vectors(index, np.arange(len(vectors))), vectors)
    session = ort.InferenceSession(str(Path(bundle) / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    items = np.array([[0, 0, 0, 5], [1, 2, 3, 4]], dtype=np.int64)
    events = (items > 0).astype(np.int64)
    scenario = np.zeros(2, dtype=np.int64)
    (got,) = session.run(None, {"items": items, "events": events, "scenario": scenario})
    with torch.no_grad():
        expected = loaded(torch.as_tensor(items), torch.as_tensor(events), torch.as_tensor(scenario)).numpy()
    assert got.shape == (2, width)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_the_recall_engine_serves_an_ensemble_bundle(ensemble_training, synthetic_dataset) -> None:
    """Serving needs nothing new: u2i answers with the summed scores of the wider vectors."""
    from recall_service.engine import RecallEngine, RecallQuery

    _, _, loaded, bundle = ensemble_training
    engine = RecallEngine.load(Path(bundle), device="cpu", threads=1)
    history = np.asarray(synthetic_dataset.sequences[0][:6], dtype=np.int64)
    (result,) = engine.recall([RecallQuery(history=history, quotas={"u2i": 20}, k=20)])
    assert len(result.items) == 20 and not np.isin(result.items, history).any()
    items = torch.as_tensor(history[None, :] + 1)
    with torch.no_grad():
        summed = sum(
            (m(items, torch.ones_like(items), torch.zeros(1, dtype=torch.long)) @ m.all_item_vectors().T)[0]
            for m in loaded.members
        ).numpy()
    np.testing.assert_allclose(result.scores, summed[result.items], atol=1e-4)


def test_the_manifest_says_how_an_ensembles_user_vectors_are_normalised() -> None:
    from recall_service.export import user_vector_note

    cosine = dataclasses.replace(SHAPE, similarity="cosine", post_norm=False)
    single, *_ = _members(1, cosine)
    assert user_vector_note(single) == " L2-normalised"
    ensemble = TowerEnsemble(_members(2, cosine))
    assert user_vector_note(ensemble) == " (each member's part L2-normalised)"
    with torch.no_grad():  # the whole vector has norm sqrt(2), each half norm 1
        users = ensemble(torch.tensor([[0, 3, 4]]), torch.tensor([[0, 1, 1]]), torch.tensor([0]))
    halves = users.reshape(1, 2, SHAPE.dim).norm(dim=-1)
    torch.testing.assert_close(halves, torch.ones(1, 2))
    assert user_vector_note(TowerEnsemble(_members(2))) == " (raw inner product with item vectors)"
