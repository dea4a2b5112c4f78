"""The folded serving graph: same scores as the model (torch and ONNX), and the bundle layout."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rank_service.export import EXPLAIN_GRAPH, example_inputs
from rank_service.folded import FoldedRanker
from rank_service.runtime import RankRuntime
from tests.rank.conftest import randomized_ranker
from tests.rank.test_export_parity import make_query

TOLERANCE_FP32 = 1e-4


@pytest.fixture(scope="module")
def runtime(random_bundle) -> RankRuntime:
    return RankRuntime.load(random_bundle[1], device="cpu", threads=1)


@pytest.mark.parametrize("history", [1, 5, 12])
def test_folded_ranker_matches_the_model_in_torch(random_bundle, history):
    """Every row of a padded batch (lengths 0 to ``history``, mixed scenarios, padding candidates)."""
    model, _ = random_bundle
    inputs = list(example_inputs(model, batch=4, history=history, candidates=9))
    inputs[0][2] = 0  # row 2: an empty history
    inputs[0][3, 1:] = 0  # row 3: a history of one
    inputs[2] = torch.tensor([0, 1, 2, 4])
    inputs[3][1, 5:] = 0  # padding candidates
    with torch.no_grad():
        expected = model(*inputs)[0]
        folded = FoldedRanker(model).eval()(*inputs)
    assert torch.isfinite(folded).all()
    assert (folded - expected).abs().max() <= TOLERANCE_FP32
    assert expected.std() > 1e-3


def test_folded_ranker_matches_a_model_with_a_narrow_mlp():
    """The folding reads the MLP's widths from the model (``mlp_width`` below twice ``dim``)."""
    model = randomized_ranker(mlp_width=8)
    assert model.mlp[0].out_features == 8
    inputs = example_inputs(model, batch=3, history=6, candidates=7)
    with torch.no_grad():
        expected = model(*inputs)[0]
        folded = FoldedRanker(model).eval()(*inputs)
    assert (folded - expected).abs().max() <= TOLERANCE_FP32
    assert expected.std() > 1e-3


def test_served_cpu_graph_is_folded_and_the_explain_graph_has_attention(random_bundle, runtime):
    _, bundle_dir = random_bundle
    graphs = runtime.manifest["graphs"]
    assert graphs["cpu"]["outputs"] == ["scores"] and graphs["cpu"]["folded"]
    assert "com.microsoft.Attention" in graphs["cpu"]["operators"]
    assert [o.name for o in runtime.session.get_outputs()] == ["scores"]
    assert graphs["explain"]["file"] == EXPLAIN_GRAPH
    explain = ort.InferenceSession(str(bundle_dir / EXPLAIN_GRAPH), providers=["CPUExecutionProvider"])
    assert [o.name for o in explain.get_outputs()] == ["scores", "attention"]
    nodes = {name: len(onnx.load(str(bundle_dir / graphs[name]["file"])).graph.node) for name in graphs}
    assert nodes["cpu"] < nodes["explain"]


def test_explained_scores_equal_served_scores(runtime):
    rng = np.random.default_rng(5)
    queries = [make_query(rng, length, count) for length, count in [(0, 4), (3, 7), (12, 5)]]
    served = runtime.score(queries)
    explained = runtime.score(queries, attention=True)
    for scores, (with_attention, _) in zip(served, explained, strict=True):
        assert np.abs(scores - with_attention).max() <= TOLERANCE_FP32
