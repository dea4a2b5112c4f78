"""Index construction, ANN quality against exact search, and device selection."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from recall_service.index import (
    GPU_MAX_K,
    INDEX_FILE,
    TUNE_K,
    TUNE_TARGET_RECALL,
    ExactGpuSearcher,
    FaissSearcher,
    build_index,
    cupy_gpu_available,
    default_index_factory,
    exact_neighbours,
    load_searcher,
    recall_at_k,
    stored_vectors,
    tune_index,
)
from recsys.bundle import read_manifest, write_manifest


def gaussian_mixture(count: int, dim: int, centres: int, spread: float, seed: int) -> np.ndarray:
    """Clustered unit vectors (isotropic noise would defeat every ANN index, see TOOLING.md)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)).astype(np.float32)
    points = means[rng.integers(0, centres, count)] + spread * rng.normal(size=(count, dim)).astype(
        np.float32
    )
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def catalog_and_queries(
    count: int, queries: int, dim: int, centres: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indexed vectors and held-out queries: draws from ONE mixture, the last ``queries`` kept out."""
    points = gaussian_mixture(count + queries, dim, centres=centres, spread=0.4, seed=seed)
    return points[:count], np.ascontiguousarray(points[count:])


def searcher_recall(searcher: FaissSearcher, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    return recall_at_k(searcher.search(queries, k)[1], exact_neighbours(vectors, queries, k))


def test_default_factory_is_exact_for_small_catalogs_and_ivf_for_large() -> None:
    assert default_index_factory(12_101) == "Flat"
    assert default_index_factory(100_000) == "Flat"
    # ~8 sqrt(N) lists, rounded to a power of two.
    assert default_index_factory(100_001) == "IVF2048,SQ8"
    assert default_index_factory(200_000) == "IVF4096,SQ8"
    assert default_index_factory(1_000_000) == "IVF8192,SQ8"
    assert default_index_factory(10**9) == "IVF65536,SQ8"


def test_tuning_picks_the_smallest_nprobe_reaching_the_target() -> None:
    faiss.omp_set_num_threads(1)
    vectors, queries = catalog_and_queries(6_000, 300, 32, centres=60)
    index = build_index(vectors, "IVF64,Flat")
    tuning = tune_index(index, vectors, min_items=1_000, k=100, target_recall=0.95)
    assert tuning.parameter == "nprobe" and tuning.reached
    assert tuning.recall >= 0.95 and tuning.k == 100 and tuning.queries == 1000
    tried = dict(tuning.tried)
    assert tried[tuning.value] == tuning.recall
    if tuning.value > 1:  # one probe fewer misses the target: the smallest value was picked
        assert tried[tuning.value - 1] < 0.95
    assert all(recall < 0.95 for value, recall in tried.items() if value < tuning.value)
    # The tuned searcher holds on queries the tuning never saw (fresh draws from the mixture).
    searcher = FaissSearcher(index, **tuning.searcher_settings(nprobe=32, ef_search=128))
    assert searcher.nprobe == tuning.value
    assert searcher_recall(searcher, vectors, queries, 100) >= 0.95


def test_tuning_picks_an_ef_search_for_hnsw_reaching_the_target() -> None:
    faiss.omp_set_num_threads(1)
    vectors, queries = catalog_and_queries(4_000, 200, 32, centres=40)
    index = build_index(vectors, "HNSW8")
    tuning = tune_index(index, vectors, min_items=1_000, k=50, target_recall=0.97, num_queries=300)
    assert tuning.parameter == "efSearch" and tuning.reached and tuning.recall >= 0.97
    assert tuning.value >= 50  # Faiss searches with max(efSearch, k): smaller values mean nothing
    settings = tuning.searcher_settings(nprobe=32, ef_search=128)
    assert settings == {"nprobe": 32, "ef_search": tuning.value}
    searcher = FaissSearcher(index, **settings)
    assert searcher_recall(searcher, vectors, queries, 50) >= 0.97


def test_small_catalogs_and_exact_indexes_keep_their_configured_parameters() -> None:
    vectors = gaussian_mixture(2_000, 16, centres=20, spread=0.4, seed=2)
    small = tune_index(build_index(vectors, "IVF16,Flat"), vectors)  # 2,000 <= TUNE_MIN_ITEMS
    assert small.parameter is None and "not tuned" in small.to_manifest()["reason"]
    assert small.searcher_settings(nprobe=32, ef_search=128) == {"nprobe": 32, "ef_search": 128}
    exact = tune_index(build_index(vectors, "Flat"), vectors, min_items=1_000)
    assert exact.to_manifest() == {"tuned": False, "reason": "IndexIDMap2: no search parameter"}
    assert (TUNE_K, TUNE_TARGET_RECALL) == (300, 0.95)


def test_tuned_nprobe_is_recorded_in_the_manifest_and_used_when_loaded(tmp_path: Path) -> None:
    faiss.omp_set_num_threads(1)
    vectors, queries = catalog_and_queries(5_000, 1_000, 32, centres=50)
    index = build_index(vectors, "IVF64,Flat")
    tuning = tune_index(index, vectors, min_items=1_000, k=100, num_queries=500)
    faiss.write_index(index, str(tmp_path / INDEX_FILE))
    # The manifest fields as export writes them (recall_service.export.export_bundle).
    write_manifest(
        tmp_path,
        "recall",
        "recall-test",
        "fingerprint",
        **tuning.searcher_settings(nprobe=32, ef_search=128),
        index_tuning=tuning.to_manifest(),
    )
    manifest = read_manifest(tmp_path, "recall")
    assert manifest["nprobe"] == tuning.value and manifest["ef_search"] == 128
    record = manifest["index_tuning"]
    assert record["tuned"] and record["parameter"] == "nprobe" and record["value"] == tuning.value
    assert record["recall"] >= record["target_recall"] == 0.95
    assert record["queries"] == 500 and record["k"] == 100 and "left out" in record["query_source"]
    # What RecallEngine.load does with the manifest. The tuned value is the smallest reaching the
    # target on the tuning sample; this catalog clears it by a margin larger than the sampling
    # error of 1,000 other queries, so the check is about transfer to unseen queries, not noise.
    searcher = load_searcher(
        tmp_path, vectors, "cpu", nprobe=int(manifest["nprobe"]), ef_search=int(manifest["ef_search"])
    )
    assert searcher.nprobe == tuning.value
    assert searcher_recall(searcher, vectors, queries, 100) >= 0.95


@pytest.mark.slow
def test_default_index_tuned_for_200k_clustered_vectors_reaches_recall_at_300() -> None:
    """The default for a 200k catalog, tuned as export tunes it, on held-out mixture queries."""
    faiss.omp_set_num_threads(2)
    vectors, queries = catalog_and_queries(200_000, 500, 64, centres=2_000)
    factory = default_index_factory(len(vectors))
    assert factory.startswith("IVF")
    index = build_index(vectors, factory)
    tuning = tune_index(index, vectors)
    assert tuning.parameter == "nprobe" and tuning.reached and tuning.k == 300
    searcher = FaissSearcher(index, nprobe=tuning.value)
    # Held-out draws, not the noisy item copies tuning used: allow their sampling error.
    assert searcher_recall(searcher, vectors, queries, 300) >= 0.94


def test_flat_index_holds_vectors_with_item_ids_and_filters() -> None:
    vectors = gaussian_mixture(500, 16, centres=20, spread=0.3, seed=3)
    index = build_index(vectors, "Flat")
    np.testing.assert_array_equal(stored_vectors(index, np.arange(500)), vectors)
    searcher = FaissSearcher(index)
    scores, ids = searcher.search(vectors[:5], 10)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    allowed = np.arange(100, 120)
    _, ids = searcher.search(vectors[:5], 50, allowed=allowed)
    assert ids.shape[1] == 20  # never more than the allowed set
    assert set(ids.ravel().tolist()) <= set(allowed.tolist())


@pytest.mark.parametrize("factory", ["IVF16,Flat", "HNSW16"])
def test_other_factories_answer_with_item_ids_and_honour_selectors(factory: str) -> None:
    vectors = gaussian_mixture(2_000, 16, centres=40, spread=0.3, seed=4)
    searcher = FaissSearcher(build_index(vectors, factory), nprobe=16, ef_search=64)
    _, ids = searcher.search(vectors[:10], 5)
    assert ids[:, 0].tolist() == list(range(10))
    allowed = np.arange(0, 2_000, 7)
    _, ids = searcher.search(vectors[:10], 5, allowed=allowed)
    found = ids[ids >= 0]
    assert found.size and np.all(found % 7 == 0)


def test_auto_device_falls_back_to_cpu_and_gpu_fails_loudly_without_one(tmp_path: Path) -> None:
    vectors = gaussian_mixture(100, 8, centres=5, spread=0.3, seed=5)
    faiss.write_index(build_index(vectors, "Flat"), str(tmp_path / INDEX_FILE))
    if cupy_gpu_available() or (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0):
        pytest.skip("this host has a GPU")
    assert load_searcher(tmp_path, vectors, device="auto").device == "cpu"
    assert load_searcher(tmp_path, vectors, device="cpu").device == "cpu"
    with pytest.raises(RuntimeError, match="gpu"):
        load_searcher(tmp_path, vectors, device="gpu")
    with pytest.raises(ValueError):
        load_searcher(tmp_path, vectors, device="tpu")


@pytest.mark.gpu
def test_exact_gpu_searcher_matches_exact_cpu_search() -> None:
    if not cupy_gpu_available():
        pytest.skip("no CUDA GPU with CuPy here")
    vectors = gaussian_mixture(5_000, 32, centres=50, spread=0.4, seed=6)
    queries = vectors[:16]
    gpu = ExactGpuSearcher(vectors)
    exact = FaissSearcher(build_index(vectors, "Flat"))
    gpu_scores, gpu_ids = gpu.search(queries, 50)
    cpu_scores, cpu_ids = exact.search(queries, 50)
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)
    assert np.mean(gpu_ids == cpu_ids) > 0.99
    allowed = np.arange(0, 5_000, 3)
    _, ids = gpu.search(queries, 20, allowed=allowed)
    assert np.all(ids % 3 == 0)


def test_export_writes_the_tuned_nprobe_into_the_bundle_manifest(
    synthetic_dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """export_bundle tunes an IVF index above ``tune_min_items`` (forced low here) and writes the
    tuned value as the manifest's ``nprobe`` with the measurement in ``index_tuning``."""
    pytest.importorskip("torch")
    from recall_service import export
    from recall_service.export import export_bundle
    from recall_service.model import TwoTowerModel, TwoTowerShape
    from recall_service.train import RecallTrainConfig, item_attribute_matrix

    attributes = item_attribute_matrix(synthetic_dataset)
    shape = TwoTowerShape(
        num_items=synthetic_dataset.num_items,
        num_attributes=len(synthetic_dataset.catalog.attribute_names),
        max_attributes=attributes.shape[1],
        num_scenarios=len(synthetic_dataset.scenario_names),
        dim=16,
        layers=1,
        heads=2,
        max_length=8,
        dropout=0.0,
    )
    model = TwoTowerModel(shape, attributes).eval()  # untrained: the index, not the model, is tested
    # The ONNX export (tests/recall/test_recall_export.py) takes most of a bundle's time: skip it.
    monkeypatch.setattr(export, "export_user_tower", lambda model, path: path.write_bytes(b"onnx"))
    config = RecallTrainConfig.tiny()
    config.index_factory = "IVF8,Flat"
    bundle = export_bundle(model, synthetic_dataset, tmp_path / "tuned", config, tune_min_items=50, tune_k=20)
    manifest = read_manifest(bundle, "recall")
    record = manifest["index_tuning"]
    assert record["tuned"] and record["parameter"] == "nprobe" and record["k"] == 20
    assert manifest["nprobe"] == record["value"] and manifest["ef_search"] == config.ef_search
    assert record["recall"] >= record["target_recall"] == TUNE_TARGET_RECALL
    assert record["queries"] == min(1000, synthetic_dataset.num_items)


class RecordingGpuIndex:
    """Stands in for a faiss-gpu index (no GPU here): answers like the CPU index, records each k."""

    def __init__(self, index: faiss.Index):
        self.index = index
        self.calls: list[int] = []

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        assert k <= GPU_MAX_K, "faiss-gpu refuses k past its selection limit"
        self.calls.append(k)
        return self.index.search(queries, k)


def test_searches_past_the_gpu_k_limit_or_with_a_filter_run_on_the_cpu_copy() -> None:
    vectors = gaussian_mixture(3_000, 16, centres=20, spread=0.4, seed=3)
    searcher = FaissSearcher(build_index(vectors, "Flat"))
    gpu = RecordingGpuIndex(searcher.cpu_index)
    searcher.gpu_index = gpu  # what use_gpu=True sets on a GPU host
    queries = vectors[:2]
    exact = searcher.cpu_index.search(queries, GPU_MAX_K + 500)
    scores, ids = searcher.search(queries, GPU_MAX_K + 500)  # past the limit: the CPU copy answers
    assert gpu.calls == [] and ids.shape == (2, GPU_MAX_K + 500)
    assert np.array_equal(ids, exact[1]) and np.allclose(scores, exact[0])
    searcher.search(queries, GPU_MAX_K)  # at the limit: the GPU
    assert gpu.calls == [GPU_MAX_K]
    _, filtered = searcher.search(queries, 10, allowed=np.arange(100))  # ID selector: the CPU copy
    assert gpu.calls == [GPU_MAX_K] and set(filtered.ravel().tolist()) <= set(range(100))
