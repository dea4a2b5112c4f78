"""The exported user tower equals the PyTorch one; the bundle's index holds exactly the item vectors."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from recall_service.export import export_user_tower  # noqa: E402
from recall_service.index import stored_vectors  # noqa: E402
from recall_service.model import TwoTowerModel, TwoTowerShape  # noqa: E402
from tests.recall.conftest import six_item_model  # noqa: E402

MAX_LENGTH = 12


# The default tower (pre-LN, cosine), the SASRec-style one (post-LN, raw inner product), and the
# default tower with hashed item titles and the unseen items' ids masked.
ARCHITECTURES = {
    "pre_ln_cosine": {},
    "post_ln_dot": {"post_norm": True, "similarity": "dot"},
    "pre_ln_cosine_text": {"text": "hash", "text_buckets": 512, "mask_unseen_ids": True},
}


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[TwoTowerModel, ort.InferenceSession]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    shape = TwoTowerShape(
        num_items=40,
        num_attributes=6,
        max_attributes=2,
        num_scenarios=3,
        dim=16,
        layers=2,
        heads=2,
        max_length=MAX_LENGTH,
        dropout=0.2,
        relative_positions=True,
        **ARCHITECTURES[request.param],
    )
    attributes = np.zeros((41, 2), dtype=np.int64)
    attributes[1:, 0] = np.arange(40) % 6 + 1
    attributes[1::2, 1] = 3
    text_arrays, seen = None, None
    if shape.text == "hash":
        from recall_service.text import HashedTitles

        titles = [f"brand{i % 5} widget{i % 7} model{i}" if i % 9 else "" for i in range(40)]
        hashed = HashedTitles.build(titles, shape.text_buckets)
        text_arrays = {"token_ids": hashed.token_ids, "offsets": hashed.offsets}
        seen = np.arange(40) % 4 != 0
    model = TwoTowerModel(shape, attributes, text_arrays, seen).eval()
    path = tmp_path_factory.mktemp("onnx") / "user_tower.onnx"
    export_user_tower(model, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return model, ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _both(model, session, items: np.ndarray, events: np.ndarray, scenario: np.ndarray):
    with torch.no_grad():
        expected = model(torch.as_tensor(items), torch.as_tensor(events), torch.as_tensor(scenario)).numpy()
    (got,) = session.run(None, {"items": items, "events": events, "scenario": scenario})
    return expected, got


@pytest.mark.parametrize("length", [0, 1, 5, MAX_LENGTH])
def test_onnx_user_tower_matches_torch_at_every_history_length(exported, length: int) -> None:
    model, session = exported
    rng = np.random.default_rng(length)
    batch, width = 4, max(length, 1)
    items = np.zeros((batch, width), dtype=np.int64)
    events = np.zeros((batch, width), dtype=np.int64)
    if length:
        items[:, -length:] = rng.integers(1, 41, size=(batch, length))
        events[:, -length:] = rng.integers(1, 5, size=(batch, length))
    scenario = rng.integers(0, 3, size=batch).astype(np.int64)
    expected, got = _both(model, session, items, events, scenario)
    assert np.isfinite(got).all()
    assert np.abs(expected - got).max() <= 1e-4
    norms = np.linalg.norm(got, axis=1)
    if model.normalised:
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    else:  # raw inner product: the norm is the model's, not forced to 1
        assert np.abs(norms - 1.0).max() > 1e-2


def test_onnx_user_tower_handles_ragged_batches(exported) -> None:
    """Rows of different lengths in one left-padded batch equal each row run alone."""
    model, session = exported
    items = np.array([[0, 0, 0, 0, 0], [0, 0, 0, 7, 9], [1, 2, 3, 4, 5]], dtype=np.int64)
    events = np.where(items > 0, 1, 0).astype(np.int64)
    scenario = np.array([0, 1, 2], dtype=np.int64)
    expected, got = _both(model, session, items, events, scenario)
    assert np.abs(expected - got).max() <= 1e-4
    for row, length in enumerate((0, 2, 5)):
        width = max(length, 1)
        alone_items, alone_events = items[row : row + 1, -width:], events[row : row + 1, -width:]
        (alone,) = session.run(
            None, {"items": alone_items, "events": alone_events, "scenario": scenario[row : row + 1]}
        )
        assert np.abs(alone[0] - got[row]).max() <= 1e-4
    # an empty history is not the same as a history: the start token is really used
    assert np.abs(got[0] - got[1]).max() > 1e-3


def test_encoding_only_the_newest_position_gives_its_full_encoding(exported) -> None:
    """The serving graph and validation compute the last block for the newest position alone."""
    model, _ = exported
    items = torch.tensor([[0, 0, 0, 0], [0, 0, 3, 7], [5, 6, 7, 8]])  # empty, short, full histories
    events = (items > 0).long()
    with torch.no_grad():
        table = model.item_table()
        full = model.encode(items, events, table)
        newest = model.encode(items, events, table, last_only=True)
    assert newest.shape == (3, 1, 16)
    torch.testing.assert_close(newest, full[:, -1:], rtol=1e-5, atol=1e-5)


def test_bundle_index_holds_exactly_the_item_vectors(recall_bundle: Path) -> None:
    manifest = json.loads((recall_bundle / "manifest.json").read_text())
    vectors = np.load(recall_bundle / "item_vectors.npy")
    index = faiss.read_index(str(recall_bundle / "index.faiss"))
    assert index.ntotal == len(vectors) == manifest["num_items"]
    assert vectors.shape[1] == manifest["dim"] == index.d
    np.testing.assert_array_equal(stored_vectors(index, np.arange(len(vectors))), vectors)
    # searching an item's own vector finds the item first (ids are the dense item ids)
    _, ids = index.search(vectors[:20], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(20))
    items = (recall_bundle / "items.txt").read_text().splitlines()
    assert len(items) == len(vectors)


def test_exporting_keeps_the_exporters_pass_by_pass_logs_out_of_the_output(tmp_path, caplog) -> None:
    import logging

    for name in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.NOTSET)  # as in a fresh process (`make run`)
    caplog.set_level(logging.INFO)
    export_user_tower(six_item_model().eval(), tmp_path / "user_tower.onnx")
    chatty = [
        r.name for r in caplog.records if r.levelno < logging.WARNING and r.name.startswith(("onnx", "torch"))
    ]
    assert chatty == []
