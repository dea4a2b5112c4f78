"""Vector search over item embeddings: a Faiss index built from an ``index_factory`` string, and an
exact GPU searcher (CuPy matrix product + top-k) for hosts where faiss-gpu does not work.

All searchers take float32 queries [B, D], return (scores [B, k] float32, ids [B, k] int64) with
``-1`` where fewer than k items qualified, and accept an optional ``allowed`` set of item ids that
restricts the search (a Faiss ``IDSelectorBatch`` on CPU, a score mask on GPU).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
# Catalogs up to this size are searched exactly: a flat scan of 100k x 64 floats is ~1-2 ms.
EXACT_SEARCH_MAX_ITEMS = 100_000
# Build-time tuning of the search parameter (IVF nprobe / HNSW efSearch) for larger catalogs:
# the smallest value whose recall@TUNE_K against exact search reaches TUNE_TARGET_RECALL on
# held-out queries. TUNE_K is the most a scenario's u2i source fetches (quota 200 + 50% slack).
# The largest k (and IVF nprobe) faiss-gpu selects on the device (GPU_MAX_SELECTION_K: 2048 with
# CUDA >= 9, the builds that exist now); a search past it fails there, so it runs on the CPU copy.
GPU_MAX_K = 2048
TUNE_MIN_ITEMS = EXACT_SEARCH_MAX_ITEMS
TUNE_TARGET_RECALL = 0.95
TUNE_K = 300
TUNE_QUERIES = 1000
# IVF lists per sqrt(N) (rounded to a power of two). Measured on 1M clustered 64-d vectors at k=300:
# 2 sqrt(N) lists (IVF2048) reach only 0.78 recall at nprobe 64, 8 sqrt(N) (IVF8192) 0.92, as the
# k-th neighbour lies beyond the query's own list; Faiss's guide recommends 4-16 sqrt(N).
IVF_LISTS_PER_SQRT_N = 8
# Vectors in the lists as 8-bit scalar codes (SQ8): a quarter of the memory, and a scan that
# reads a quarter of the bytes. Same 1M clustered vectors, k=200, nprobe 48-128: recall 0.9433-
# 0.9717 vs 0.9443-0.9743 with float vectors, QPS 1.23-1.43x at batch 64 and 0.93-1.31x at
# batch 1 (docs/EXPERIMENTS.md); the tuning then picks the nprobe that reaches the target.
IVF_CODES = "SQ8"


def default_index_factory(num_items: int) -> str:
    """Exact inner product for small catalogs; above, IVF with ~8 sqrt(N) lists (a power of two)
    of 8-bit scalar-quantised vectors, whose ``nprobe`` is tuned at build time
    (:func:`tune_index`)."""
    if num_items <= EXACT_SEARCH_MAX_ITEMS:
        return "Flat"
    lists = 1 << round(np.log2(IVF_LISTS_PER_SQRT_N * np.sqrt(num_items)))
    return f"IVF{min(lists, 65536)},{IVF_CODES}"


def build_index(vectors: np.ndarray, factory: str, seed: int = 7, train_size: int = 0) -> faiss.Index:
    """Build an inner-product index over ``vectors`` (row i has id i) from a factory string.

    Indexes that cannot hold ids themselves (Flat, HNSW) are wrapped in ``IndexIDMap2``, so every
    index answers with int64 item ids and can ``reconstruct`` a stored vector by id. IVF coarse
    quantisers are trained on at most ``train_size`` sampled rows (0 = 40 per list, just above
    Faiss's minimum of 39, which keeps k-means to seconds on a million items).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.arange(len(vectors), dtype=np.int64)
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = _ivf_of(index)
    if ivf is None:
        index = faiss.IndexIDMap2(index)
    if not index.is_trained:
        if ivf is not None:
            ivf.cp.seed = seed
            ivf.cp.niter = 10
        sample_size = train_size or (40 * ivf.nlist if ivf is not None else len(vectors))
        sample = vectors
        if len(vectors) > sample_size:
            rows = np.random.default_rng(seed).choice(len(vectors), size=sample_size, replace=False)
            sample = vectors[np.sort(rows)]
        index.train(sample)
    index.add_with_ids(vectors, ids)
    if ivf is not None:
        ivf.make_direct_map()
    return index


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def search_parameter(index: faiss.Index) -> str | None:
    """The index's speed/recall knob: ``nprobe`` (IVF), ``efSearch`` (HNSW) or None (exact)."""
    if _ivf_of(index) is not None:
        return "nprobe"
    if _hnsw_of(index) is not None:
        return "efSearch"
    return None


def _search_with(index: faiss.Index, parameter: str, value: int, queries: np.ndarray, k: int) -> np.ndarray:
    params = (
        faiss.SearchParametersIVF(nprobe=value)
        if parameter == "nprobe"
        else faiss.SearchParametersHNSW(efSearch=value)
    )
    return index.search(queries, k, params=params)[1]


def without_ids(ids: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """Rows of ``ids`` [Q, k+1] minus each row's ``excluded`` id (the last column when absent): [Q, k]."""
    drop = ids == excluded[:, None]
    drop[~drop.any(axis=1), -1] = True
    drop &= np.cumsum(drop, axis=1) == 1  # one per row, even if an id repeats
    return ids[~drop].reshape(len(ids), ids.shape[1] - 1)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids [Q, k] of the exact top-k by inner product (brute force with Faiss Flat)."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's exact top-k (``truth`` rows) present in ``found`` (-1 ignored)."""
    k = truth.shape[1]
    hits = [
        np.intersect1d(row[row >= 0], true_row, assume_unique=True).size
        for row, true_row in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) / k


def parameter_grid(parameter: str, index: faiss.Index, k: int) -> list[int]:
    """The values tried in ascending order: nprobe 1 ... nlist (nlist is exact search), efSearch
    k ... 16k (Faiss searches with max(efSearch, k), so smaller values add nothing)."""
    if parameter == "nprobe":
        nlist = _ivf_of(index).nlist
        steps = sorted({round(b * 2**e) for e in range(17) for b in (1.0, 1.5)} | {3})
        return [v for v in steps if v < nlist] + [nlist]
    return [round(k * factor) for factor in (1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16)]


@dataclass
class IndexTuning:
    """The search parameter chosen at build time, or why none was (``parameter`` None)."""

    parameter: str | None
    value: int | None = None
    k: int = TUNE_K
    target_recall: float = TUNE_TARGET_RECALL
    recall: float | None = None  # recall@k at ``value`` on the tuning queries
    reached: bool = False
    queries: int = 0
    query_source: str = ""
    tried: list[tuple[int, float]] = field(default_factory=list)  # (value, recall), ascending value
    seconds: float = 0.0
    reason: str = ""

    def searcher_settings(self, nprobe: int, ef_search: int) -> dict[str, int]:
        """``nprobe`` / ``ef_search`` for the manifest: the tuned one replaces its configured value."""
        if self.parameter == "nprobe":
            nprobe = int(self.value)
        elif self.parameter == "efSearch":
            ef_search = int(self.value)
        return {"nprobe": nprobe, "ef_search": ef_search}

    def to_manifest(self) -> dict[str, object]:
        """The manifest's ``index_tuning`` record."""
        if self.parameter is None:
            return {"tuned": False, "reason": self.reason}
        return {
            "tuned": True,
            "parameter": self.parameter,
            "value": self.value,
            "k": self.k,
            "target_recall": self.target_recall,
            "recall": round(float(self.recall), 4),
            "reached": self.reached,
            "queries": self.queries,
            "query_source": self.query_source,
            "tried": [[value, round(recall, 4)] for value, recall in self.tried],
            "seconds": round(self.seconds, 2),
        }


def tune_search_parameter(
    index: faiss.Index,
    vectors: np.ndarray,
    k: int = TUNE_K,
    target_recall: float = TUNE_TARGET_RECALL,
    queries: np.ndarray | None = None,
    num_queries: int = TUNE_QUERIES,
    seed: int = 7,
) -> IndexTuning:
    """The smallest nprobe / efSearch whose recall@k against exact search reaches ``target_recall``.

    ``vectors`` are the rows the index holds (row i = id i). Without ``queries``, ``num_queries``
    sampled items are the queries, held out by leave-one-out: each item is dropped from its own
    exact and approximate results, so it is scored on its k other neighbours like an unseen query
    from the catalog's distribution (and exactly like an i2i query). Steps up
    :func:`parameter_grid`, then bisects between the last value that missed and the first that
    reached the target (recall grows with the parameter: exactly so for IVF, whose probed lists
    only grow). When no value reaches it, the largest tried is kept (``reached`` False) and a
    warning logged.
    """
    parameter = search_parameter(index)
    if parameter is None:
        return IndexTuning(None, reason=f"{type(faiss.downcast_index(index)).__name__}: no search parameter")
    started = time.perf_counter()
    k = max(1, min(k, len(vectors) - 1))
    if queries is None:
        rng = np.random.default_rng(seed)
        held_out = rng.choice(len(vectors), size=min(num_queries, len(vectors)), replace=False)
        queries = vectors[held_out]
        source = "sampled items, each left out of its own results"
    else:
        held_out, source = None, "given"
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def neighbours(found: np.ndarray) -> np.ndarray:
        return found if held_out is None else without_ids(found, held_out)

    fetch = k if held_out is None else k + 1
    truth = neighbours(exact_neighbours(vectors, queries, fetch))
    recalls: dict[int, float] = {}

    def measure(value: int) -> float:
        if value not in recalls:
            found = neighbours(_search_with(index, parameter, value, queries, fetch))
            recalls[value] = recall_at_k(found, truth)
        return recalls[value]

    grid = parameter_grid(parameter, index, k)
    missed, chosen = grid[0] - 1, None  # never bisect below the grid (efSearch < k is efSearch k)
    for value in grid:
        if measure(value) >= target_recall:
            chosen = value
            break
        missed = value
    if chosen is None:
        chosen = missed
        log.warning(
            "%s %d reaches recall@%d %.3f only, below the target %.3f",
            parameter,
            chosen,
            k,
            recalls[chosen],
            target_recall,
        )
    else:
        low, high = missed, chosen  # measure(low) < target <= measure(high)
        while high - low > 1:
            middle = (low + high) // 2
            if measure(middle) >= target_recall:
                high = middle
            else:
                low = middle
        chosen = high
    tuning = IndexTuning(
        parameter,
        value=int(chosen),
        k=k,
        target_recall=target_recall,
        recall=recalls[chosen],
        reached=recalls[chosen] >= target_recall,
        queries=len(queries),
        query_source=source,
        tried=sorted(recalls.items()),
        seconds=time.perf_counter() - started,
    )
    log.info(
        "tuned %s = %d: recall@%d %.4f on %d held-out queries (%.1f s)",
        parameter,
        chosen,
        k,
        tuning.recall,
        len(queries),
        tuning.seconds,
    )
    return tuning


def tune_index(
    index: faiss.Index,
    vectors: np.ndarray,
    min_items: int = TUNE_MIN_ITEMS,
    k: int = TUNE_K,
    target_recall: float = TUNE_TARGET_RECALL,
    num_queries: int = TUNE_QUERIES,
    seed: int = 7,
) -> IndexTuning:
    """Build-time policy: tune the search parameter of catalogs above ``min_items`` items."""
    if len(vectors) <= min_items:
        return IndexTuning(None, reason=f"{len(vectors)} items <= {min_items}: search parameter not tuned")
    return tune_search_parameter(index, vectors, k, target_recall, num_queries=num_queries, seed=seed)


def stored_vectors(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The vectors an index holds for ``ids`` (for tests and audits)."""
    return np.stack([index.reconstruct(int(i)) for i in ids])


class VectorSearcher(Protocol):
    """What the recall engine needs from a vector index."""

    device: str
    description: str

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


class FaissSearcher:
    """A Faiss index on CPU, or on a GPU when faiss-gpu is installed and sees one."""

    def __init__(
        self,
        index: faiss.Index,
        nprobe: int = 32,
        ef_search: int = 128,
        use_gpu: bool = False,
        id_range: tuple[int, int] | None = None,
    ):
        self.cpu_index = index
        self.nprobe = nprobe
        self.ef_search = ef_search
        # Only ids in [start, end) are searched (a recall shard over an index of every item).
        self.id_range = id_range
        self.ivf = _ivf_of(index)
        self.hnsw = None if self.ivf is not None else _hnsw_of(index)
        self.gpu_index = None
        self.device = "cpu"
        if use_gpu:
            resources = faiss.StandardGpuResources()
            self.gpu_index = faiss.index_cpu_to_gpu(resources, 0, index)
            self._gpu_resources = resources  # keep alive as long as the GPU index
            if self.ivf is not None:  # the device probes at most GPU_MAX_K lists
                gpu_nprobe = min(nprobe, GPU_MAX_K)
                faiss.GpuParameterSpace().set_index_parameter(self.gpu_index, "nprobe", gpu_nprobe)
            self.device = "gpu"
        self.description = f"faiss {type(faiss.downcast_index(index)).__name__} on {self.device}"

    def _parameters(self, selector: faiss.IDSelector | None) -> faiss.SearchParameters:
        if self.ivf is not None:
            return faiss.SearchParametersIVF(nprobe=self.nprobe, sel=selector)
        if self.hnsw is not None:
            return faiss.SearchParametersHNSW(efSearch=self.ef_search, sel=selector)
        return faiss.SearchParameters(sel=selector)

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, self.cpu_index.ntotal))
        if allowed is None and self.id_range is None and self.gpu_index is not None and k <= GPU_MAX_K:
            # faiss-gpu indexes take no ID selectors and select at most GPU_MAX_K: filtered searches
            # and larger k stay on the CPU copy (the same index, the same results).
            return self.gpu_index.search(queries, k)
        selector = None
        if allowed is not None:  # a shard's allowed ids are its own already
            allowed = np.ascontiguousarray(allowed, dtype=np.int64)
            selector = faiss.IDSelectorBatch(allowed)
            k = max(1, min(k, len(allowed)))
        elif self.id_range is not None:
            start, end = self.id_range
            selector = faiss.IDSelectorRange(start, end)
            k = max(1, min(k, end - start))
        scores, ids = self.cpu_index.search(queries, k, params=self._parameters(selector))
        return scores, ids


class ExactGpuSearcher:
    """Exact maximum inner product search on a GPU with CuPy: one matrix product + top-k.

    Needs no faiss-gpu, so it works on cards the faiss-gpu wheels were not built for.
    """

    def __init__(self, vectors: np.ndarray, first_id: int = 0):
        import cupy

        self.cupy = cupy
        self.vectors = cupy.asarray(np.ascontiguousarray(vectors, dtype=np.float32))
        self.first_id = first_id  # row i holds item first_id + i (a recall shard's slice)
        self.device = "gpu"
        self.description = "exact inner product on GPU (cupy)"

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        cp = self.cupy
        num_items = self.vectors.shape[0]
        k = max(1, min(k, num_items))
        scores = cp.asarray(np.ascontiguousarray(queries, dtype=np.float32)) @ self.vectors.T
        if allowed is not None:
            mask = cp.full(num_items, -cp.inf, dtype=cp.float32)
            mask[cp.asarray(np.asarray(allowed, dtype=np.int64) - self.first_id)] = 0.0
            scores += mask[None, :]
        top = (
            cp.argpartition(-scores, k - 1, axis=1)[:, :k]
            if k < num_items
            else cp.tile(cp.arange(num_items), (scores.shape[0], 1))
        )
        top_scores = cp.take_along_axis(scores, top, axis=1)
        order = cp.argsort(-top_scores, axis=1)
        ids = cp.take_along_axis(top, order, axis=1)
        top_scores = cp.take_along_axis(top_scores, order, axis=1)
        ids = cp.where(cp.isfinite(top_scores), ids + self.first_id, -1)
        return cp.asnumpy(top_scores).astype(np.float32), cp.asnumpy(ids).astype(np.int64)


def restrict_to_range(searcher: VectorSearcher, vectors: np.ndarray, start: int, end: int) -> VectorSearcher:
    """``searcher`` limited to items ``[start, end)`` (a recall shard), answering the same ids and
    scores as the full searcher restricted to them. An exact index is rebuilt over that slice of
    ``vectors`` (the full one is dropped: a shard holds 1/count of it); an approximate index (IVF,
    HNSW) is kept and searched with an id range selector, so its results are its own, filtered."""
    if isinstance(searcher, ExactGpuSearcher):
        return ExactGpuSearcher(vectors[start:end], first_id=start)
    if not isinstance(searcher, FaissSearcher):
        raise TypeError(f"cannot restrict {type(searcher).__name__} to an item range")
    if searcher.ivf is not None or searcher.hnsw is not None or not _is_flat(searcher.cpu_index):
        return FaissSearcher(
            searcher.cpu_index,
            searcher.nprobe,
            searcher.ef_search,
            use_gpu=searcher.gpu_index is not None,
            id_range=(start, end),
        )
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    index.add_with_ids(
        np.ascontiguousarray(vectors[start:end], dtype=np.float32), np.arange(start, end, dtype=np.int64)
    )
    return FaissSearcher(index, searcher.nprobe, searcher.ef_search, use_gpu=searcher.gpu_index is not None)


def _is_flat(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return isinstance(inner, faiss.IndexFlat) and inner.metric_type == faiss.METRIC_INNER_PRODUCT


def faiss_gpu_available() -> bool:
    """faiss-gpu is installed and sees at least one GPU (faiss-cpu has no GPU symbols)."""
    return (
        hasattr(faiss, "StandardGpuResources") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    )


def cupy_gpu_available() -> bool:
    """CuPy is installed and a CUDA device is usable."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, or a CUDA runtime error on hosts without a driver
        return False


def load_searcher(
    bundle_dir: Path,
    vectors: np.ndarray,
    device: str = "auto",
    nprobe: int = 32,
    ef_search: int = 128,
    threads: int | None = None,
    gpu_backend: str = "auto",
) -> VectorSearcher:
    """The searcher for ``device`` (auto|cpu|gpu) over the bundle's index and item vectors.

    ``gpu`` (or ``auto`` on a GPU host) prefers faiss-gpu, then the CuPy exact searcher
    (``gpu_backend`` = faiss|cupy forces one); ``gpu`` without either raises, ``auto`` falls back
    to the CPU index.
    """
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
    if threads:
        faiss.omp_set_num_threads(threads)
    index = faiss.read_index(str(Path(bundle_dir) / INDEX_FILE))
    if device != "cpu":
        if gpu_backend in ("auto", "faiss") and faiss_gpu_available():
            try:
                return FaissSearcher(index, nprobe, ef_search, use_gpu=True)
            except (RuntimeError, AttributeError) as error:  # e.g. a wheel built for other cards
                log.warning("faiss-gpu failed (%s); trying the CuPy exact searcher", error)
        if gpu_backend in ("auto", "cupy") and cupy_gpu_available():
            return ExactGpuSearcher(vectors)
        if device == "gpu":
            raise RuntimeError("device=gpu but neither faiss-gpu nor CuPy can use a GPU here")
    return FaissSearcher(index, nprobe, ef_search)
