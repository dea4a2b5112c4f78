"""`recsys bench ann`: recall@k vs QPS of the default recall index against hnswlib, usearch and Faiss HNSW.

Datasets: ``clustered`` (``--num-vectors`` unit vectors from a mixture of ``--centres`` Gaussian
centres, queries held out from the same mixture) and, with ``--bundle DIR``, a recall bundle's
``item_vectors.npy`` (queries: user-tower vectors of sampled histories, or noisy copies of items).
Each index is built once with ``--threads`` threads, then every search-parameter value of its sweep
(nprobe / efSearch / expansion_search) is timed at each ``--k`` and ``--batch`` (batch 1: one query
per call, one thread's worth of work; larger batches may use every thread). Ground truth is exact
inner-product search. Prints JSON (command, machine, threads, versions, build time, memory,
curves, and per dataset/k/batch the QPS of the default index and of the best peer at recall@k >=
``--target-recall``) and writes one PNG per dataset x batch beside ``--out``.

The default index is what ``recsys export recall`` builds for a catalog of that size
(:func:`recall_service.index.default_index_factory`), its search parameter tuned at build time as
export tunes it (:func:`recall_service.index.tune_index`). Peers not installed (``pip install
'.[bench]'``) are skipped with the reason in the JSON.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import faiss
import numpy as np

from recall_service.index import (
    TUNE_MIN_ITEMS,
    FaissSearcher,
    build_index,
    default_index_factory,
    exact_neighbours,
    recall_at_k,
    search_parameter,
    tune_index,
)
from recsys.timing import latency_summary, machine_info, report_json

log = logging.getLogger(__name__)

TARGET_RECALL = 0.95
PEERS = ("faiss-hnsw", "hnswlib", "usearch")
LIBRARIES = ("default", *PEERS)
# nprobe values swept for an IVF default index (plus the value tuned at build time).
NPROBE_SWEEP = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# efSearch / expansion_search as multiples of k: every HNSW library searches with max(ef, k).
EF_SWEEP = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass
class AnnData:
    """One benchmark dataset: the indexed vectors, held-out queries and what they are."""

    name: str
    vectors: np.ndarray
    queries: np.ndarray
    description: dict[str, object]


def clustered_vectors(
    count: int, dim: int, centres: int, spread: float, seed: int, chunk: int = 200_000
) -> np.ndarray:
    """``count`` unit vectors from a mixture of ``centres`` standard-normal centres plus isotropic
    noise of std ``spread`` per dimension (clustered like real embeddings: isotropic noise alone
    would defeat every ANN index, see TOOLING.md). Built in chunks, float32 throughout."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim), dtype=np.float32)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        rows = means[rng.integers(0, centres, stop - start)]
        rows += spread * rng.standard_normal(rows.shape, dtype=np.float32)
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        out[start:stop] = rows
    return out


def clustered_dataset(
    num_vectors: int, num_queries: int, dim: int, centres: int, spread: float, seed: int
) -> AnnData:
    """The mixture's first ``num_vectors`` draws are indexed, the next ``num_queries`` are queries."""
    points = clustered_vectors(num_vectors + num_queries, dim, centres, spread, seed)
    return AnnData(
        name="clustered",
        vectors=points[:num_vectors],
        queries=np.ascontiguousarray(points[num_vectors:]),
        description={
            "kind": "synthetic Gaussian mixture, L2-normalised",
            "num_vectors": num_vectors,
            "dim": dim,
            "centres": centres,
            "vectors_per_centre": round(num_vectors / centres, 1),
            "spread": spread,
            "seed": seed,
            "queries": num_queries,
            "query_source": "held-out draws from the same mixture (not in the index)",
        },
    )


def heldout_queries(vectors: np.ndarray, count: int, noise: float, seed: int) -> np.ndarray:
    """Noisy copies of sampled items (queries that are not in the catalog but near it): each item
    plus isotropic Gaussian noise whose norm is ``noise`` times the item's (unit rows stay unit)."""
    rng = np.random.default_rng(seed)
    rows = vectors[rng.choice(len(vectors), size=min(count, len(vectors)), replace=False)]
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    jitter = rng.standard_normal(rows.shape, dtype=np.float32)
    jitter *= noise * norms / np.linalg.norm(jitter, axis=1, keepdims=True)
    queries = rows + jitter
    if np.allclose(norms, 1.0, atol=1e-3):
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return np.ascontiguousarray(queries, dtype=np.float32)


def user_vectors(bundle: Path, count: int, history_length: int, seed: int) -> np.ndarray:
    """The bundle's user tower (ONNX Runtime) on ``count`` histories of ``history_length`` items
    drawn by popularity without repeats (as ``recall_service.bench`` samples them), all VIEWs,
    scenario 0."""
    import onnxruntime as ort

    manifest = json.loads((bundle / "manifest.json").read_text())
    counts = np.load(bundle / "popularity_counts.npy").astype(np.float64) + 1.0
    rng = np.random.default_rng(seed)
    length = max(1, min(history_length, len(counts), int(manifest.get("max_length", history_length))))
    items = np.stack(
        [rng.choice(len(counts), size=length, replace=False, p=counts / counts.sum()) for _ in range(count)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(bundle / manifest["onnx"]["file"]), options, providers=["CPUExecutionProvider"]
    )
    feeds = {
        "items": (items + 1).astype(np.int64),
        "events": np.ones_like(items, dtype=np.int64),
        "scenario": np.zeros(count, dtype=np.int64),
    }
    vectors = np.concatenate(
        [session.run(None, {n: v[s : s + 256] for n, v in feeds.items()})[0] for s in range(0, count, 256)]
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)


def bundle_dataset(
    bundle: Path, num_queries: int, query_kind: str, noise: float, history_length: int, seed: int
) -> AnnData:
    """A recall bundle's item vectors; queries from its user tower (``users``) or ``items``."""
    vectors = np.ascontiguousarray(np.load(bundle / "item_vectors.npy"), dtype=np.float32)
    manifest = json.loads((bundle / "manifest.json").read_text())
    source = ""
    if query_kind == "users":
        try:
            queries = user_vectors(bundle, num_queries, history_length, seed)
            source = (
                f"user-tower vectors (ONNX) of {num_queries} synthetic histories of {history_length} "
                "items drawn by popularity, all VIEW, scenario 0"
            )
        except Exception as error:  # e.g. onnxruntime missing or an older bundle layout
            log.warning("user vectors unavailable (%s): using noisy item copies", error)
            source = f"user vectors unavailable ({type(error).__name__}: {error}); "
            query_kind = "items"
    if query_kind == "items":
        queries = heldout_queries(vectors, num_queries, noise=noise, seed=seed)
        source += f"held-out noisy copies of sampled items (Gaussian noise of norm {noise} x the item's norm)"
    return AnnData(
        name="bundle",
        vectors=vectors,
        queries=queries,
        description={
            "kind": "recall bundle item vectors",
            "bundle": str(bundle),
            "dataset": manifest.get("dataset"),
            "version": manifest.get("version"),
            "bundle_index_factory": manifest.get("index_factory"),
            "similarity": manifest.get("similarity"),
            "num_vectors": len(vectors),
            "dim": int(vectors.shape[1]),
            "queries": len(queries),
            "query_source": source,
        },
    )


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class AnnIndex:
    """One library's index: ``build`` it, then ``search`` at a value of its search parameter."""

    library = ""
    parameter: str | None = None

    def __init__(self, threads: int, hnsw_m: int, ef_construction: int):
        self.threads = threads
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.info: dict[str, object] = {}

    def build(self, vectors: np.ndarray) -> None:
        raise NotImplementedError

    def index_bytes(self) -> int:
        raise NotImplementedError

    def values(self, k: int) -> list[int | None]:
        return [max(k, round(k * factor)) for factor in EF_SWEEP]

    def search(self, queries: np.ndarray, k: int, value: int | None) -> np.ndarray:
        raise NotImplementedError


class DefaultIndex(AnnIndex):
    """The project's default: ``default_index_factory(N)`` built by ``build_index``, searched by
    the serving ``FaissSearcher``, its parameter tuned like ``recsys export recall`` tunes it."""

    library = "faiss (project default)"

    def __init__(
        self, *args, factory: str, tune_min_items: int, tune_k: int, target_recall: float, seed: int
    ):
        super().__init__(*args)
        self.factory = factory
        self.tune_min_items = tune_min_items
        self.tune_k = tune_k
        self.target_recall = target_recall
        self.seed = seed
        self.tuned_value: int | None = None

    def build(self, vectors: np.ndarray) -> None:
        factory = self.factory or default_index_factory(len(vectors))
        index = build_index(vectors, factory, seed=self.seed)
        self.parameter = search_parameter(index)
        self.searcher = FaissSearcher(index)
        self.info["factory"] = factory
        started = time.perf_counter()
        tuning = tune_index(
            index,
            vectors,
            self.tune_min_items,
            k=self.tune_k,
            target_recall=self.target_recall,
            seed=self.seed,
        )
        self.info["tuning"] = tuning.to_manifest()
        self.info["tuning_s"] = round(time.perf_counter() - started, 2)  # part of build_s, as in export
        if tuning.parameter is not None:
            self.tuned_value = int(tuning.value)
            settings = tuning.searcher_settings(self.searcher.nprobe, self.searcher.ef_search)
            self.searcher.nprobe, self.searcher.ef_search = settings["nprobe"], settings["ef_search"]

    def index_bytes(self) -> int:
        return int(faiss.serialize_index(self.searcher.cpu_index).nbytes)

    def values(self, k: int) -> list[int | None]:
        if self.parameter is None:
            return [None]
        if self.parameter == "nprobe":
            nlist = self.searcher.ivf.nlist
            values = {v for v in NPROBE_SWEEP if v <= nlist}
        else:
            values = set(super().values(k))
        if self.tuned_value is not None:
            values.add(self.tuned_value)
        return sorted(values)

    def search(self, queries: np.ndarray, k: int, value: int | None) -> np.ndarray:
        if self.parameter == "nprobe":
            self.searcher.nprobe = value
        elif self.parameter == "efSearch":
            self.searcher.ef_search = value
        return self.searcher.search(queries, k)[1]


class FaissHnswIndex(AnnIndex):
    library = "faiss IndexHNSWFlat (inner product)"
    parameter = "efSearch"

    def build(self, vectors: np.ndarray) -> None:
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self.ef_construction
        self.index.add(vectors)
        self.info.update(M=self.hnsw_m, efConstruction=self.ef_construction)

    def index_bytes(self) -> int:
        return int(faiss.serialize_index(self.index).nbytes)

    def search(self, queries: np.ndarray, k: int, value: int | None) -> np.ndarray:
        return self.index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=value))[1]


class HnswlibIndex(AnnIndex):
    library = "hnswlib (space ip)"
    parameter = "ef"

    def build(self, vectors: np.ndarray) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="ip", dim=vectors.shape[1])
        self.index.init_index(
            max_elements=len(vectors), M=self.hnsw_m, ef_construction=self.ef_construction, random_seed=7
        )
        self.index.add_items(vectors, np.arange(len(vectors)), num_threads=self.threads)
        self.info.update(M=self.hnsw_m, ef_construction=self.ef_construction)

    def index_bytes(self) -> int:
        return int(self.index.index_file_size())

    def search(self, queries: np.ndarray, k: int, value: int | None) -> np.ndarray:
        self.index.set_ef(value)
        threads = 1 if len(queries) == 1 else self.threads
        return self.index.knn_query(queries, k=k, num_threads=threads)[0].astype(np.int64)


class UsearchIndex(AnnIndex):
    library = "usearch (metric ip, f32)"
    parameter = "expansion_search"

    def build(self, vectors: np.ndarray) -> None:
        from usearch.index import Index

        self.index = Index(
            ndim=vectors.shape[1],
            metric="ip",
            dtype="f32",
            connectivity=self.hnsw_m,
            expansion_add=self.ef_construction,
        )
        self.index.add(np.arange(len(vectors)), vectors, threads=self.threads)
        self.info.update(
            connectivity=self.hnsw_m,
            expansion_add=self.ef_construction,
            hardware_acceleration=str(self.index.hardware_acceleration),
        )

    def index_bytes(self) -> int:
        return int(self.index.memory_usage)

    def search(self, queries: np.ndarray, k: int, value: int | None) -> np.ndarray:
        self.index.expansion_search = value
        threads = 1 if len(queries) == 1 else self.threads
        keys = self.index.search(queries, k, threads=threads).keys
        return np.atleast_2d(keys).astype(np.int64)  # missing keys (uint64 max) become -1


PEER_MODULES = {"faiss-hnsw": None, "hnswlib": "hnswlib", "usearch": "usearch"}
PEER_CLASSES: dict[str, type[AnnIndex]] = {
    "faiss-hnsw": FaissHnswIndex,
    "hnswlib": HnswlibIndex,
    "usearch": UsearchIndex,
}


def library_version(name: str) -> str | None:
    distribution = {"default": "faiss-cpu", "faiss-hnsw": "faiss-cpu"}.get(name, name)
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def time_searches(
    index: AnnIndex, queries: np.ndarray, k: int, value: int | None, batch: int
) -> tuple[np.ndarray, float, dict[str, float]]:
    """(ids [Q, k], QPS, latency summary per call) of searching every query, ``batch`` per call."""
    # Batch 1 runs on one thread in every library, as the recall service runs Faiss (threads=1):
    # an OpenMP team of 2 on a busy 2-core host made single-query Flat search ~100x slower here.
    faiss.omp_set_num_threads(1 if batch == 1 else index.threads)
    index.search(queries[: min(batch, 8)], k, value)  # warm-up
    found, latencies = [], []
    started = time.perf_counter()
    for start in range(0, len(queries), batch):
        begin = time.perf_counter()
        found.append(index.search(queries[start : start + batch], k, value))
        latencies.append((time.perf_counter() - begin) * 1000.0)
    wall_s = time.perf_counter() - started
    return np.concatenate(found), len(queries) / wall_s, latency_summary(latencies)


def build(name: str, index: AnnIndex, vectors: np.ndarray) -> dict[str, object]:
    """Build ``index``; its report: library, version, build seconds and threads, memory."""
    gc.collect()
    faiss.omp_set_num_threads(index.threads)
    rss_before = _rss_bytes()
    started = time.perf_counter()
    index.build(vectors)
    build_s = time.perf_counter() - started
    gc.collect()
    log.info("%s: built in %.1f s", name, build_s)
    return {
        "library": index.library,
        "version": library_version(name),
        "parameter": index.parameter,
        "build_s": round(build_s, 2),
        "build_threads": index.threads,
        "index_bytes": index.index_bytes(),
        "rss_delta_bytes": _rss_bytes() - rss_before,
        **index.info,
    }


def sweep(
    indexes: dict[str, AnnIndex],
    queries: np.ndarray,
    truth: np.ndarray,
    ks: list[int],
    batches: list[int],
    rounds: int,
    stop_recall: float,
) -> dict[str, list[dict[str, object]]]:
    """Curves per library: for each k and batch, points {value, recall, qps, qps_rounds,
    latency_ms} in ascending value. Libraries take turns (ABAB..., the order rotated each round) so
    that load from other processes on a shared host falls on all of them alike; a point's ``qps``
    is its best round. A library's values for a k are fixed on its first pass, which stops after
    the first value whose recall reaches ``stop_recall``."""
    names = list(indexes)
    curves: dict[str, list[dict[str, object]]] = {name: [] for name in names}
    for k in ks:
        values: dict[str, list[int | None]] = {}
        for batch in batches:
            points: dict[str, dict[int | None, dict]] = {name: {} for name in names}
            for round_ in range(rounds):
                for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                    index = indexes[name]
                    for value in values.get(name, index.values(k)):
                        found, qps, latency = time_searches(index, queries, k, value, batch)
                        point = points[name].get(value)
                        if point is None:
                            recall = round(recall_at_k(found, truth[:, :k]), 4)
                            point = {
                                "value": value,
                                "recall": recall,
                                "qps_rounds": [],
                                "latency_ms": latency,
                            }
                            points[name][value] = point
                        elif qps > max(point["qps_rounds"]):
                            point["latency_ms"] = latency
                        point["qps_rounds"].append(round(qps, 1))
                        log.info(
                            "  %s k=%d batch=%d %s=%s: recall %.4f, %.0f QPS",
                            name,
                            k,
                            batch,
                            index.parameter,
                            value,
                            point["recall"],
                            qps,
                        )
                        if name not in values and point["recall"] >= stop_recall:
                            break
                    values[name] = list(points[name])
            for name in names:
                ordered = [points[name][value] for value in values[name]]
                for point in ordered:
                    point["qps"] = max(point["qps_rounds"])
                curves[name].append({"k": k, "batch": batch, "points": ordered})
    return curves


def best_point(points: list[dict], target: float, smallest_value: bool) -> dict | None:
    """The point reaching ``target``: with the smallest value (the default index as it would be
    tuned), or with the highest QPS (a peer at its best setting)."""
    reaching = [p for p in points if p["recall"] >= target]
    if not reaching:
        return None
    if smallest_value:
        return min(reaching, key=lambda p: -1 if p["value"] is None else p["value"])
    return max(reaching, key=lambda p: p["qps"])


def summarise(indexes: dict[str, dict], ks: list[int], batches: list[int], target: float) -> list[dict]:
    """Per k and batch: the default at its smallest setting reaching ``target``, the best peer
    there, and whether the bar (default QPS >= best peer QPS, both at recall >= target) is met."""

    def curve(report: dict, k: int, batch: int) -> list[dict]:
        for one in report.get("curves", []):
            if one["k"] == k and one["batch"] == batch:
                return one["points"]
        return []

    rows = []
    default = indexes.get("default", {})
    for k in ks:
        for batch in batches:
            row: dict[str, object] = {"k": k, "batch": batch, "target_recall": target}
            points = curve(default, k, batch)
            chosen = best_point(points, target, smallest_value=True)
            row["default"] = chosen and {key: chosen[key] for key in ("value", "recall", "qps")}
            tuned = default.get("tuning", {}).get("value")
            tuned_point = next((p for p in points if tuned is not None and p["value"] == tuned), None)
            row["default_tuned"] = tuned_point and {
                key: tuned_point[key] for key in ("value", "recall", "qps")
            }
            peers = []
            for name in PEERS:
                peer = best_point(curve(indexes.get(name, {}), k, batch), target, smallest_value=False)
                if peer:
                    peers.append({"library": name, **{key: peer[key] for key in ("value", "recall", "qps")}})
            row["best_peer"] = max(peers, key=lambda p: p["qps"]) if peers else None
            if chosen is None:
                row["bar_met"] = False
            elif row["best_peer"] is None:
                row["bar_met"] = True  # no peer reaches the target recall at all
            else:
                row["bar_met"] = chosen["qps"] >= row["best_peer"]["qps"]
                row["qps_ratio"] = round(chosen["qps"] / row["best_peer"]["qps"], 3)
            rows.append(row)
    return rows


def plot(
    dataset: dict[str, object], name: str, batches: list[int], ks: list[int], target: float, out: Path
) -> list[str]:
    """One PNG per batch size: recall@k (x) vs QPS (log y), a subplot per k, a line per library."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for batch in batches:
        figure, axes = plt.subplots(1, len(ks), figsize=(6 * len(ks), 4.5), squeeze=False)
        for axis, k in zip(axes[0], ks, strict=True):
            for library, report in dataset["indexes"].items():
                for one in report.get("curves", []):
                    if one["k"] == k and one["batch"] == batch and one["points"]:
                        recalls = [p["recall"] for p in one["points"]]
                        qps = [p["qps"] for p in one["points"]]
                        label = library if library != "default" else f"default ({report.get('factory')})"
                        axis.plot(recalls, qps, marker="o", label=label)
            axis.axvline(target, color="grey", linestyle="--", linewidth=1)
            axis.set_yscale("log")
            axis.set_xlabel(f"recall@{k}")
            axis.set_ylabel("queries per second")
            axis.set_title(f"{name}: k={k}, batch {batch}")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        figure.tight_layout()
        path = out.with_name(f"{out.stem}-{name}-batch{batch}.png")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path.name)
    return written


def bench_dataset(data: AnnData, args: argparse.Namespace, ks: list[int], batches: list[int]) -> dict:
    """Ground truth, every requested library built (all kept in memory), then the interleaved sweep."""
    log.info("%s: %d x %d vectors, %d queries", data.name, *data.vectors.shape, len(data.queries))
    started = time.perf_counter()
    truth = exact_neighbours(data.vectors, data.queries, min(max(ks), len(data.vectors)))
    reports: dict[str, dict] = {}
    result: dict[str, object] = {
        **data.description,
        "ground_truth": {
            "method": "exact inner product, faiss IndexFlatIP",
            "seconds": round(time.perf_counter() - started, 2),
        },
        "indexes": reports,
    }
    built: dict[str, AnnIndex] = {}
    for name in args.libraries:
        module = PEER_MODULES.get(name)
        if module is not None:
            try:
                importlib.import_module(module)
            except ImportError as error:
                reports[name] = {"skipped": f"{module} not installed ({error}): pip install '.[bench]'"}
                continue
        common = (args.threads, args.hnsw_m, args.ef_construction)
        index = (
            DefaultIndex(
                *common,
                factory=args.default_factory,
                tune_min_items=args.tune_min_items,
                tune_k=args.tune_k,
                target_recall=args.target_recall,
                seed=args.seed,
            )
            if name == "default"
            else PEER_CLASSES[name](*common)
        )
        try:
            reports[name] = build(name, index, data.vectors)
            built[name] = index
        except Exception as error:  # one broken library must not lose the others' numbers
            log.exception("%s failed on %s", name, data.name)
            reports[name] = {"error": f"{type(error).__name__}: {error}"}
    started = time.perf_counter()
    for name, curves in sweep(built, data.queries, truth, ks, batches, args.rounds, args.stop_recall).items():
        reports[name]["curves"] = curves
    result["sweep_s"] = round(time.perf_counter() - started, 1)
    built.clear()
    gc.collect()
    result["summary"] = summarise(reports, ks, batches, args.target_recall)
    return result


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recsys bench ann", description=__doc__.splitlines()[0])
    parser.add_argument("--num-vectors", type=int, default=1_000_000, help="clustered vectors (0 = skip)")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--centres", type=int, default=0, help="mixture centres (0 = num-vectors / 100)")
    parser.add_argument("--spread", type=float, default=0.4, help="per-dimension std around a centre")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries per dataset")
    parser.add_argument("--bundle", type=Path, help="a recall bundle folder (item_vectors.npy)")
    parser.add_argument("--artifacts", type=Path, help="with --data: bundle = ARTIFACTS/DATA/recall")
    parser.add_argument("--data", default="synthetic", help="dataset name under --artifacts")
    parser.add_argument("--bundle-queries", choices=("users", "items"), default="users")
    parser.add_argument("--query-noise", type=float, default=0.3, help="noise of item-copy queries")
    parser.add_argument("--history-length", type=int, default=20, help="items per sampled history")
    parser.add_argument("--k", default="200,300", help="comma-separated k values")
    parser.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=2, help="build and batched-search threads")
    parser.add_argument("--libraries", default=",".join(LIBRARIES), help=f"subset of {','.join(LIBRARIES)}")
    parser.add_argument("--hnsw-m", type=int, default=16, help="HNSW links per node (all HNSW peers)")
    parser.add_argument("--ef-construction", type=int, default=100, help="HNSW build beam (all peers)")
    parser.add_argument("--target-recall", type=float, default=TARGET_RECALL)
    parser.add_argument("--stop-recall", type=float, default=0.985, help="end a sweep once recall reaches it")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per point (best one kept)")
    parser.add_argument("--tune-k", type=int, default=0, help="k the default index is tuned at (0 = max --k)")
    parser.add_argument(
        "--tune-min-items", type=int, default=TUNE_MIN_ITEMS, help="tune catalogs above this (as export)"
    )
    parser.add_argument(
        "--default-factory", default="", help="Faiss factory instead of the default's ('' = by catalog size)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write the JSON here and the PNGs beside it")
    args = parser.parse_args(argv)
    if args.bundle is None and args.artifacts is not None:
        args.bundle = args.artifacts / args.data / "recall"
    args.libraries = [name for name in args.libraries.split(",") if name]
    unknown = set(args.libraries) - set(LIBRARIES)
    if unknown:
        parser.error(f"unknown libraries {sorted(unknown)}; choose from {LIBRARIES}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ks, batches = _int_list(args.k), _int_list(args.batch)
    args.tune_k = args.tune_k or max(ks)
    faiss.omp_set_num_threads(args.threads)
    report: dict[str, object] = {
        "command": " ".join(["recsys bench ann", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {**machine_info(), "load_average_start": list(os.getloadavg())},
        "threads": {
            "build": args.threads,
            "search_batch_1": 1,
            f"search_batch_{max(batches)}": args.threads,
        },
        "versions": {name: library_version(name) for name in ("faiss-cpu", "hnswlib", "usearch", "numpy")},
        "settings": {
            "k": ks,
            "batches": batches,
            "target_recall": args.target_recall,
            "stop_recall": args.stop_recall,
            "rounds": args.rounds,
            "hnsw_m": args.hnsw_m,
            "ef_construction": args.ef_construction,
            "default_factory": args.default_factory or "by catalog size (default_index_factory)",
            "default_tuning": {"k": args.tune_k, "min_items": args.tune_min_items},
        },
        "note": "QPS measured on a host shared with other processes: expect noise of tens of percent",
        "datasets": {},
    }
    datasets: list[AnnData] = []
    if args.num_vectors > 0:
        centres = args.centres or max(1, args.num_vectors // 100)
        datasets.append(
            clustered_dataset(args.num_vectors, args.queries, args.dim, centres, args.spread, args.seed)
        )
    if args.bundle is not None:
        if (args.bundle / "item_vectors.npy").is_file():
            datasets.append(
                bundle_dataset(
                    args.bundle,
                    args.queries,
                    args.bundle_queries,
                    args.query_noise,
                    args.history_length,
                    args.seed,
                )
            )
        else:
            report["datasets"]["bundle"] = {"skipped": f"no item_vectors.npy under {args.bundle}"}
    started = time.perf_counter()
    while datasets:
        data = datasets.pop(0)  # one dataset in memory while its indexes are built
        result = bench_dataset(data, args, ks, batches)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            result["plots"] = plot(result, data.name, batches, ks, args.target_recall, args.out)
        report["datasets"][data.name] = result
        del data
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    for name, result in report["datasets"].items():
        for row in result.get("summary", []):
            print(summary_line(name, row), file=sys.stderr)
    report_json(report, args.out)
    return 0


def summary_line(dataset: str, row: dict) -> str:
    """One human line per dataset/k/batch for the target recall."""
    target = row["target_recall"]

    def describe(point: dict | None, who: str) -> str:
        if not point:
            return f"{who}: never reaches {target}"
        name = f"{who} {point['library']}" if "library" in point else who
        return f"{name} @{point['value']}: recall {point['recall']:.4f}, {point['qps']:.0f} QPS"

    return (
        f"[{dataset} k={row['k']} batch={row['batch']}] {describe(row['default'], 'default')} | "
        f"{describe(row['best_peer'], 'best peer')} | bar {'MET' if row['bar_met'] else 'NOT met'}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
