"""Index construction, ANN quality against exact search, and device selection."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from recall_service.index import (
    INDEX_FILE,
    ExactGpuSearcher,
    FaissSearcher,
    build_index,
    cupy_gpu_available,
    default_index_factory,
    load_searcher,
    stored_vectors,
)


def gaussian_mixture(count: int, dim: int, centres: int, spread: float, seed: int) -> np.ndarray:
    """Clustered unit vectors (isotropic noise would defeat every ANN index, see TOOLING.md)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(centres, dim)).astype(np.float32)
    points = means[rng.integers(0, centres, count)] + spread * rng.normal(size=(count, dim)).astype(
        np.float32
    )
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def ann_recall(count: int, queries: int = 300, k: int = 100) -> float:
    faiss.omp_set_num_threads(2)
    vectors = gaussian_mixture(count, 64, centres=max(count // 100, 20), spread=0.4, seed=0)
    rng = np.random.default_rng(1)
    noise = 0.1 * rng.normal(size=(queries, 64)).astype(np.float32)
    probes = vectors[rng.choice(count, queries, replace=False)] + noise
    factory = default_index_factory(count)
    assert factory.startswith("IVF")
    searcher = FaissSearcher(build_index(vectors, factory))
    _, found = searcher.search(probes, k)
    exact = faiss.IndexFlatIP(64)
    exact.add(vectors)
    _, truth = exact.search(probes, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, truth, strict=True)]))


def test_default_factory_is_exact_for_small_catalogs_and_ivf_for_large() -> None:
    assert default_index_factory(12_101) == "Flat"
    assert default_index_factory(200_000) == "IVF1024,Flat"
    assert default_index_factory(1_000_000) == "IVF2048,Flat"


def test_ann_recall_at_100_on_200k_clustered_vectors() -> None:
    assert ann_recall(200_000) >= 0.95


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
