"""ONNX graphs vs the torch model: the CPU graph and the fused-attention graph (fp32 and the
shipped fp16) on the CPU provider, for histories of length 0, 1, several and L, and padding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rank_service.export import FUSED_ATTENTION_OP, export_onnx, operator_types
from rank_service.features import SOURCES
from rank_service.runtime import RankQuery, RankRuntime, session_options

TOLERANCE_FP32 = 1e-4
MAX_HISTORY = 12


def make_query(rng: np.random.Generator, length: int, count: int, num_items: int = 60) -> RankQuery:
    mask = rng.random((count, len(SOURCES))) < 0.5
    return RankQuery(
        history=rng.choice(num_items, size=length, replace=False),
        event_types=rng.integers(0, 5, size=length),
        scenario=int(rng.integers(0, 5)),
        candidates=rng.choice(num_items, size=count, replace=False),
        recall_scores=rng.normal(size=count).astype(np.float32),
        source_scores=(rng.normal(size=(count, len(SOURCES))) * mask).astype(np.float32),
        source_mask=mask,
    )


def torch_scores(model, runtime: RankRuntime, queries: list[RankQuery]) -> list[np.ndarray]:
    batch = runtime.pack(queries)
    with torch.no_grad():
        scores = model(*(torch.from_numpy(v) for v in batch.feeds().values()))[0].numpy()
    return [scores[row, :count] for row, count in enumerate(batch.candidate_counts)]


@pytest.fixture(scope="module")
def runtime(random_bundle) -> RankRuntime:
    return RankRuntime.load(random_bundle[1], device="cpu", threads=1)


@pytest.mark.parametrize("length", [0, 1, 5, MAX_HISTORY, MAX_HISTORY + 7])
def test_cpu_graph_matches_torch(random_bundle, runtime, length):
    model, _ = random_bundle
    query = make_query(np.random.default_rng(length), min(length, 50), 9)
    (served,) = runtime.score([query])
    (expected,) = torch_scores(model, runtime, [query])
    assert np.isfinite(served).all()
    assert np.abs(served - expected).max() <= TOLERANCE_FP32
    assert served.std() > 1e-3  # the check compares real, input-dependent scores


def test_padding_in_a_batch_does_not_change_scores(random_bundle, runtime):
    model, _ = random_bundle
    rng = np.random.default_rng(1)
    queries = [
        make_query(rng, length, count) for length, count in [(0, 3), (1, 11), (7, 1), (MAX_HISTORY, 6)]
    ]
    batched = runtime.score(queries)
    for query, scores, expected in zip(queries, batched, torch_scores(model, runtime, queries), strict=True):
        (alone,) = runtime.score([query])
        assert np.abs(scores - alone).max() <= TOLERANCE_FP32
        assert np.abs(scores - expected).max() <= TOLERANCE_FP32


def test_empty_history_is_finite_in_every_graph(random_bundle, runtime):
    _, bundle_dir = random_bundle
    query = make_query(np.random.default_rng(2), 0, 5)
    feeds = runtime.pack([query]).feeds()
    assert feeds["history"].shape == (1, 1) and not feeds["history"].any()  # one padding column
    for graph in runtime.manifest["graphs"].values():
        session = ort.InferenceSession(str(bundle_dir / graph["file"]), providers=["CPUExecutionProvider"])
        assert np.isfinite(session.run(["scores"], feeds)[0]).all()


def test_manifest_lists_operators_and_gpu_graph_has_fused_attention(random_bundle, runtime):
    _, bundle_dir = random_bundle
    graphs = runtime.manifest["graphs"]
    for graph in graphs.values():
        assert graph["operators"] == operator_types(bundle_dir / graph["file"])
    assert FUSED_ATTENTION_OP in graphs["gpu"]["operators"]
    assert "Softmax" not in graphs["gpu"]["operators"]  # every attention is the fused op
    assert {"LayerNormalization", "Gelu"} <= set(graphs["gpu"]["operators"])
    assert FUSED_ATTENTION_OP not in graphs["cpu"]["operators"]


def test_fused_attention_graph_matches_torch_on_cpu_provider(random_bundle, runtime, tmp_path: Path):
    """The fp32 form of the GPU graph (same export, before fp16) to 1e-4; the shipped fp16 graph
    on the CPU provider to fp16 precision."""
    model, bundle_dir = random_bundle
    fused = export_onnx(model, tmp_path / "fused.onnx", fused_attention=True)
    assert FUSED_ATTENTION_OP in operator_types(fused)
    rng = np.random.default_rng(3)
    queries = [make_query(rng, length, count) for length, count in [(0, 4), (1, 8), (MAX_HISTORY, 8)]]
    feeds = runtime.pack(queries).feeds()
    expected = torch_scores(model, runtime, queries)
    gpu_graph = bundle_dir / runtime.manifest["graphs"]["gpu"]["file"]
    for path, tolerance in [(fused, TOLERANCE_FP32), (gpu_graph, 0.05)]:
        session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        scores = session.run(["scores"], feeds)[0]
        for row, want in enumerate(expected):
            got = scores[row, : len(want)]
            assert np.abs(got - want).max() <= tolerance * max(1.0, float(np.abs(want).max())), path.name


def test_export_command_rebuilds_the_bundle_from_a_checkpoint(random_bundle, tmp_path: Path):
    from rank_service.export import checkpoint_path, main, save_checkpoint
    from recsys.data.dataset import DEFAULT_SCENARIOS, IdMap

    model, _ = random_bundle
    bundle_dir = tmp_path / "rank"
    items = IdMap(f"item-{i}" for i in range(model.config.num_items))
    save_checkpoint(model, checkpoint_path(bundle_dir), items, list(DEFAULT_SCENARIOS), data_fingerprint="fp")
    assert main(["--bundle", str(bundle_dir)]) == 0
    rebuilt = RankRuntime.load(bundle_dir, device="cpu", threads=1)
    assert rebuilt.manifest["data_fingerprint"] == "fp" and rebuilt.items == items
    query = make_query(np.random.default_rng(4), 6, 10)
    (expected,) = torch_scores(model, rebuilt, [query])
    assert np.abs(rebuilt.score([query])[0] - expected).max() <= TOLERANCE_FP32
