"""The recall engine: what the gRPC servicer, offline evaluation and the rank trainer all run.

A batch of queries costs ONE user-tower run (ONNX Runtime) and one index search per source and
filter group; co-visitation and popularity are table look-ups. Each query's source lists are then
filtered (seen items, excluded ids, category, sponsored), merged under per-source quotas,
de-duplicated and topped up from popularity so that ``k`` items come back whenever the catalog
has them (:mod:`recsys.recall_merge`). No torch here.

For user profiles (``RecallService.UserProfile``) the engine also holds, per bundle, the centroid
of each category's and each brand's item embeddings (:class:`AttributeCentroids`, computed once on
first use: the servicer touches them when a bundle is loaded) and answers which of them are nearest
a user embedding (:meth:`RecallEngine.nearest_attributes`), with the same batched user-tower run.

A sharded engine (``shard=(index, count)``) recalls only from the items it owns
(:func:`~recsys.recall_merge.shard_range`): its index holds them alone and every source is
restricted to them; :meth:`RecallEngine.source_lists` answers the lists unmerged, so that a fan-out
merges its shards into exactly the unsharded answer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from recall_service.index import VectorSearcher, load_searcher, restrict_to_range
from recall_service.sources import CovisitTable, PopularityTable, covisit_candidates
from recsys.bundle import BundleError, read_manifest, resolve_bundle
from recsys.data.dataset import EventType, IdMap
from recsys.jit import isin
from recsys.recall_merge import (
    CandidateList,
    SourceList,
    SourceLists,
    fetch_size,
    merge_sources,
    shard_range,
)
from recsys.sources import RECALL_SOURCES as SOURCES
from recsys.sources import SOURCE_INDEX

log = logging.getLogger(__name__)

_EMPTY_IDS = np.zeros(0, dtype=np.int64)
CENTROID_CHUNK = 65_536  # items per step of the centroid computation


class AnnSampler(Protocol):
    """What the engine hands sampled u2i searches to (``recall_service.ann_quality``)."""

    def offer(
        self, engine: RecallEngine, vectors: np.ndarray, ids: np.ndarray, allowed: np.ndarray | None
    ) -> None: ...


@dataclass
class RecallQuery:
    """One recall request in dense ids (unknown external ids already dropped)."""

    history: np.ndarray  # dense item ids, oldest first
    event_types: np.ndarray | None = None  # aligned with history; None = all VIEW
    scenario: int = 0
    seed_items: np.ndarray = field(default_factory=lambda: _EMPTY_IDS)
    quotas: dict[str, int] = field(default_factory=dict)  # empty -> the scenario's defaults
    k: int = 100
    exclude_history: bool = True
    exclude_items: np.ndarray = field(default_factory=lambda: _EMPTY_IDS)
    category: int = -1  # dense category id, -1 = any
    sponsored_only: bool = False
    fill_popular: bool = True  # top up to k from popularity when the sources run short


@dataclass
class _Gathered:
    """A query's source lists before the merge."""

    quotas: dict[str, int]
    excluded: np.ndarray
    lists: dict[str, SourceList]


@dataclass(frozen=True)
class AttributeCentroids:
    """One unit vector per attribute value (a category or a brand): the mean of the L2-normalised
    embeddings of the items that have it, normalised again. ``present[a]`` is False for a value no
    item has; its row is zero and it is never anyone's nearest."""

    vectors: np.ndarray  # float32 [values, dim]
    present: np.ndarray  # bool [values]

    @classmethod
    def of(cls, item_vectors: np.ndarray, labels: np.ndarray, count: int) -> AttributeCentroids:
        """Centroids of values ``0..count-1`` of ``labels`` (one per item; -1 or >= count: none)."""
        vectors = np.asarray(item_vectors, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.int64)
        keep = np.flatnonzero((labels >= 0) & (labels < count))
        order = keep[np.argsort(labels[keep], kind="stable")]  # items grouped by value
        sums = np.zeros((count, vectors.shape[1]), dtype=np.float64)
        for start in range(0, len(order), CENTROID_CHUNK):  # bounded memory for large catalogs
            rows = order[start : start + CENTROID_CHUNK]
            unit = vectors[rows].astype(np.float64)
            unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
            values, starts = np.unique(labels[rows], return_index=True)
            sums[values] += np.add.reduceat(unit, starts, axis=0)
        norms = np.linalg.norm(sums, axis=1)
        present = norms > 1e-12
        centroids = np.zeros_like(sums, dtype=np.float32)
        centroids[present] = sums[present] / norms[present, None]
        return cls(centroids, present)

    def nearest(self, similarities: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
        """(int32 values, float32 similarities) of the ``top_n`` present values with the highest
        ``similarities`` (one per value), best first; ties by value index."""
        candidates = np.flatnonzero(self.present)
        order = np.argsort(-similarities[candidates], kind="stable")[:top_n]
        chosen = candidates[order]
        return chosen.astype(np.int32), similarities[chosen].astype(np.float32)


@dataclass(frozen=True)
class NearestAttributes:
    """The category and brand centroids nearest one user embedding, best first (empty without a
    history: no embedding to compare)."""

    categories: np.ndarray  # int32 indices into category_names
    category_similarities: np.ndarray  # float32 cosine
    brands: np.ndarray  # int32 indices into brand_names
    brand_similarities: np.ndarray  # float32 cosine

    @classmethod
    def empty(cls) -> NearestAttributes:
        none, no_scores = np.zeros(0, np.int32), np.zeros(0, np.float32)
        return cls(none, no_scores, none, no_scores)


class UserTower:
    """The exported user tower in ONNX Runtime, threads pinned."""

    def __init__(self, path: Path, device: str = "auto", threads: int | None = None):
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No spinning while idle: the threads would burn CPU the other services need (TOOLING.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "gpu":
            log.warning("onnxruntime has no CUDA provider here: the user tower runs on CPU")
        # The fused SkipLayerNormalization CPU kernel is slower than the unfused graph (TOOLING.md).
        disabled = ["SkipLayerNormFusion"] if providers[0] == "CPUExecutionProvider" else []
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=providers, disabled_optimizers=disabled
        )
        self.device = "gpu" if providers[0] == "CUDAExecutionProvider" else "cpu"

    def __call__(self, items: np.ndarray, events: np.ndarray, scenarios: np.ndarray) -> np.ndarray:
        (vectors,) = self.session.run(None, {"items": items, "events": events, "scenario": scenarios})
        return vectors


def _read_names(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


class RecallEngine:
    """Loads a recall bundle and answers batches of :class:`RecallQuery`."""

    def __init__(
        self,
        manifest: dict,
        user_tower: UserTower,
        searcher: VectorSearcher,
        item_vectors: np.ndarray,
        items: IdMap,
        covisit: CovisitTable,
        popularity: PopularityTable,
        item_category: np.ndarray,
        category_names: list[str],
        item_brand: np.ndarray,
        brand_names: list[str],
        item_bid: np.ndarray,
        threads: int | None = None,
    ):
        self.threads = threads
        self.manifest = manifest
        self.version: str = manifest["version"]
        self.scenarios: list[str] = list(manifest["scenarios"])
        self.max_length: int = int(manifest["max_length"])
        self.user_tower = user_tower
        self.searcher = searcher
        self.item_vectors = item_vectors
        self.items = items
        self.covisit = covisit
        self.popularity = popularity
        self.item_category = item_category
        self.category_names = category_names
        self.item_brand = item_brand
        self.brand_names = brand_names
        self.item_bid = item_bid
        covisit_settings = manifest.get("covisit", {})
        self.covisit_recent_items = int(covisit_settings.get("recent_items", 5))
        self.covisit_recency_decay = float(covisit_settings.get("recency_decay", 0.6))
        self.default_sources: dict[str, dict[str, float]] = manifest.get("default_sources", {})
        self.shard_index, self.shard_count = 0, 1
        self.item_range: tuple[int, int] | None = None  # [start, end) when sharded
        # Set while this engine is the served one and live ANN quality is sampled.
        self.ann_sampler: AnnSampler | None = None
        self._filter_cache: dict[
            tuple[int, bool], tuple[np.ndarray | None, np.ndarray | None, np.ndarray]
        ] = {}

    @classmethod
    def load(
        cls,
        bundle_dir: Path,
        device: str = "auto",
        threads: int | None = None,
        shard: tuple[int, int] | None = None,
    ) -> RecallEngine:
        """Load and verify a bundle written by ``recall_service.export`` (device: auto|cpu|gpu);
        ``bundle_dir`` may be a folder of versions, then its ``current`` one is loaded.
        ``shard`` = (index, count) recalls from that shard's item range only."""
        bundle_dir = resolve_bundle(bundle_dir)
        manifest = read_manifest(bundle_dir, "recall", verify=True)
        item_vectors = np.load(bundle_dir / "item_vectors.npy")
        items = IdMap.load(bundle_dir / "items.txt")
        searcher = load_searcher(
            bundle_dir,
            item_vectors,
            device,
            nprobe=int(manifest.get("nprobe", 32)),
            ef_search=int(manifest.get("ef_search", 128)),
            threads=threads,
        )
        engine = cls(
            threads=threads,
            manifest=manifest,
            user_tower=UserTower(bundle_dir / manifest["onnx"]["file"], device, threads),
            searcher=searcher,
            item_vectors=item_vectors,
            items=items,
            covisit=CovisitTable.load(bundle_dir),
            popularity=PopularityTable.load(bundle_dir),
            item_category=np.load(bundle_dir / "item_category.npy"),
            category_names=_read_names(bundle_dir / "categories.txt"),
            item_brand=np.load(bundle_dir / "item_brand.npy"),
            brand_names=_read_names(bundle_dir / "brands.txt"),
            item_bid=np.load(bundle_dir / "item_bid.npy"),
        )
        engine.check_sizes(bundle_dir)
        if shard is not None and shard[1] > 1:
            engine.restrict_to_shard(*shard)
        log.info(
            "recall bundle %s loaded: %d items, %s, user tower on %s%s",
            engine.version,
            len(engine.items),
            engine.searcher.description,
            engine.user_tower.device,
            f"; shard {engine.shard_index} of {engine.shard_count}: items {engine.item_range}"
            if engine.item_range
            else "",
        )
        return engine

    @property
    def num_items(self) -> int:
        return len(self.items)

    def restrict_to_shard(self, index: int, count: int) -> None:
        """Recall from shard ``index`` of ``count``'s items only (the catalog stays whole): the
        index keeps only them (an exact index is rebuilt over the slice; others filter by id)."""
        start, end = shard_range(index, count, self.num_items)
        self.searcher = restrict_to_range(self.searcher, self.item_vectors, start, end)
        self.shard_index, self.shard_count, self.item_range = index, count, (start, end)
        self._filter_cache.clear()

    def use_interaction_tables(self, covisit: CovisitTable, popularity: PopularityTable) -> None:
        """Answer from these co-visitation and popularity tables instead of the bundle's (offline
        evaluation of the validation phase: tables that have not counted the validation items)."""
        if covisit.num_items != self.num_items or len(popularity.counts) != self.num_items:
            raise ValueError(f"tables for {covisit.num_items} items, the bundle has {self.num_items}")
        self.covisit, self.popularity = covisit, popularity
        self._filter_cache.clear()  # its popularity orders came from the old table

    def check_sizes(self, bundle_dir: Path) -> None:
        """Raise BundleError naming the file whose row count disagrees with ``items.txt``."""
        num_items = self.num_items
        if "num_items" in self.manifest and int(self.manifest["num_items"]) != num_items:
            raise BundleError(
                f"{bundle_dir}: items.txt: {num_items} item ids, manifest says {self.manifest['num_items']}"
            )
        counts = {
            "item_vectors.npy": len(self.item_vectors),
            "item_category.npy": len(self.item_category),
            "item_brand.npy": len(self.item_brand),
            "item_bid.npy": len(self.item_bid),
            "popularity_counts.npy": len(self.popularity.counts),
        }
        index = getattr(self.searcher, "cpu_index", None)
        if index is not None:
            counts["index.faiss"] = int(index.ntotal)
        for name, count in counts.items():
            if count != num_items:
                raise BundleError(f"{bundle_dir}: {name}: {count} rows, items.txt has {num_items} items")

    def pin_threads(self) -> None:
        """Give the CALLING thread the configured number of Faiss (OpenMP) threads.

        OpenMP's thread count is per calling thread: set only where the bundle was loaded, a
        worker thread would search with one OpenMP thread per core, spinning between queries."""
        if self.threads:
            import faiss

            faiss.omp_set_num_threads(self.threads)

    # ------------------------------------------------------------------ quotas and filters

    def default_quotas(self, scenario: int, k: int) -> dict[str, int]:
        """The scenario's default source mix scaled to ``k`` (each source at least 1)."""
        name = self.scenarios[scenario] if 0 <= scenario < len(self.scenarios) else ""
        mix = self.default_sources.get(name) or self.default_sources.get("home") or {"u2i": 1.0}
        return {source: max(1, math.ceil(share * k)) for source, share in mix.items() if share > 0}

    def _resolve_quotas(self, query: RecallQuery) -> dict[str, int]:
        quotas = query.quotas or self.default_quotas(query.scenario, query.k)
        unknown = set(quotas) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown recall sources {sorted(unknown)}; known: {SOURCES}")
        # A quota <= 0 means "up to k"; no source may contribute more than k.
        return {source: query.k if quota <= 0 else min(quota, query.k) for source, quota in quotas.items()}

    def _filter(
        self, category: int, sponsored_only: bool
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
        """(allowed ids or None, allowed mask or None, popularity order within them) for a filter;
        a shard's mask and order hold its own items only (its index holds no others)."""
        key = (category, sponsored_only)
        if key not in self._filter_cache:
            mask = None
            if category >= 0:
                mask = self.item_category == category
            if sponsored_only:
                sponsored = self.item_bid > 0
                mask = sponsored if mask is None else mask & sponsored
            ranked = self.popularity.ranked(category)
            if sponsored_only:
                ranked = ranked[self.item_bid[ranked] > 0]
            allowed = None if mask is None else np.flatnonzero(mask).astype(np.int64)
            if self.item_range is not None:
                start, end = self.item_range
                owned = np.zeros(self.num_items, dtype=bool)
                owned[start:end] = True
                mask = owned if mask is None else mask & owned
                ranked = ranked[(ranked >= start) & (ranked < end)]
                if allowed is not None:
                    allowed = allowed[(allowed >= start) & (allowed < end)]
            self._filter_cache[key] = (allowed, mask, ranked)
        return self._filter_cache[key]

    # ------------------------------------------------------------------ sources

    def _user_vectors(self, queries: Sequence[RecallQuery]) -> np.ndarray:
        """One user-tower run for all ``queries`` (histories truncated to the newest L items)."""
        width = max(1, min(self.max_length, max(len(q.history) for q in queries)))
        items = np.zeros((len(queries), width), dtype=np.int64)
        events = np.zeros((len(queries), width), dtype=np.int64)
        for row, query in enumerate(queries):
            recent = np.asarray(query.history, dtype=np.int64)[-width:]
            if recent.size == 0:
                continue
            items[row, -recent.size :] = recent + 1
            if query.event_types is None:
                events[row, -recent.size :] = EventType.VIEW
            else:
                types = np.asarray(query.event_types, dtype=np.int64)[-recent.size :]
                events[row, -recent.size :] = np.where(types == EventType.UNSPECIFIED, EventType.VIEW, types)
        scenarios = np.asarray([q.scenario for q in queries], dtype=np.int64)
        return self.user_tower(items, events, scenarios)

    @staticmethod
    def _seeds(query: RecallQuery) -> np.ndarray:
        """The i2i anchors: the request's seed items, else the newest history item."""
        seeds = query.seed_items if len(query.seed_items) else query.history[-1:]
        return np.asarray(seeds, dtype=np.int64)

    def _seed_vectors(self, seeds: Sequence[np.ndarray]) -> np.ndarray:
        """Mean item vector of each query's seeds, L2-normalised."""
        vectors = np.stack([self.item_vectors[s].mean(axis=0) for s in seeds]).astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def _vector_source(
        self,
        vectors: np.ndarray,
        rows: list[int],
        fetch: list[int],
        excluded: list[np.ndarray],
        queries: Sequence[RecallQuery],
        sampler: AnnSampler | None = None,
    ) -> dict[int, SourceList]:
        """ANN results of ``vectors`` (one per row in ``rows``): one search per filter group.
        ``sampler`` gets each group's raw search (it samples and checks it off the request path)."""
        results: dict[int, SourceList] = {}
        groups: dict[tuple[int, bool], list[int]] = {}
        for position, row in enumerate(rows):
            groups.setdefault((queries[row].category, queries[row].sponsored_only), []).append(position)
        for (category, sponsored_only), positions in groups.items():
            allowed, _, _ = self._filter(category, sponsored_only)
            if allowed is not None and allowed.size == 0:
                for position in positions:
                    results[rows[position]] = SourceList(_EMPTY_IDS, np.zeros(0, np.float32))
                continue
            # Over-fetch by the number of excluded items so that k survive the exclusion.
            k = max(fetch[rows[p]] + len(excluded[rows[p]]) for p in positions)
            scores, ids = self.searcher.search(vectors[positions], min(k, self.num_items), allowed)
            if sampler is not None:
                sampler.offer(self, vectors[positions], ids, allowed)
            for position, score_row, id_row in zip(positions, scores, ids, strict=True):
                row = rows[position]
                keep = (id_row >= 0) & ~isin(id_row, excluded[row])
                results[row] = SourceList(id_row[keep][: fetch[row]], score_row[keep][: fetch[row]])
        return results

    def _covisit_source(self, query: RecallQuery, fetch: int, excluded: np.ndarray) -> SourceList:
        anchors: list[int] = [int(s) for s in dict.fromkeys(np.asarray(query.seed_items).tolist())]
        weights: list[float] = [1.0] * len(anchors)
        age = 0
        for item in np.asarray(query.history)[::-1].tolist():
            if age >= self.covisit_recent_items:
                break
            if item in anchors:
                continue
            anchors.append(int(item))
            weights.append(self.covisit_recency_decay**age)
            age += 1
        items, scores = covisit_candidates(
            self.covisit, np.asarray(anchors, np.int64), np.asarray(weights), self.popularity.counts
        )
        _, mask, _ = self._filter(query.category, query.sponsored_only)
        keep = ~isin(items, excluded)
        if mask is not None:
            keep &= mask[items]
        return SourceList(items[keep][:fetch], scores[keep][:fetch])

    def _popular_source(self, query: RecallQuery, fetch: int, excluded: np.ndarray) -> SourceList:
        """The ``fetch`` most popular items that pass the query's filters (also the merge's top-up)."""
        _, _, ranked = self._filter(query.category, query.sponsored_only)
        head = ranked[: fetch + len(excluded)]
        head = head[~isin(head, excluded)][:fetch]
        return SourceList(head, self.popularity.scores(head))

    # ------------------------------------------------------------------ recall

    def recall(self, queries: Sequence[RecallQuery]) -> list[CandidateList]:
        """Candidates for every query; one user-tower run and one search per source for the batch."""
        return [
            merge_sources(
                found.lists,
                found.quotas,
                query.k,
                fill=self._fill(query, found.excluded) if query.fill_popular else None,
            )
            for query, found in zip(queries, self._gather(queries), strict=True)
        ]

    def source_lists(self, queries: Sequence[RecallQuery]) -> list[SourceLists]:
        """Every query's source lists unmerged, each item with its popularity rank (the tie-break
        a fan-out merges shards by); :func:`recsys.recall_merge.merge_shards` of all shards' lists
        is what an unsharded engine's :meth:`recall` answers."""
        ranks = self.popularity.ranks

        def ranked(found: SourceList) -> SourceList:
            return SourceList(found.items, found.scores, ranks[found.items])

        return [
            SourceLists(
                quotas=found.quotas,
                k=query.k,
                lists={source: ranked(found_list) for source, found_list in found.lists.items()},
                fill=ranked(self._fill(query, found.excluded)()) if query.fill_popular else None,
            )
            for query, found in zip(queries, self._gather(queries), strict=True)
        ]

    def _fill(self, query: RecallQuery, excluded: np.ndarray) -> Callable[[], SourceList]:
        """The merge's top-up (the query's k most popular allowed items), computed only if needed."""
        return lambda: self._popular_source(query, query.k, excluded)

    def _gather(self, queries: Sequence[RecallQuery]) -> list[_Gathered]:
        """Each query's source lists: one user-tower run and one search per source for the batch."""
        if not queries:
            return []
        quotas = [self._resolve_quotas(q) for q in queries]
        excluded = [self._excluded(q) for q in queries]
        lists: list[dict[str, SourceList]] = [{} for _ in queries]

        def fetch(source: str) -> list[int]:
            """Per query: how many items ``source`` fetches (its quota plus slack, capped)."""
            return [fetch_size(q[source], self.num_items) if source in q else 0 for q in quotas]

        u2i_rows = [r for r, q in enumerate(queries) if "u2i" in quotas[r] and len(q.history)]
        if u2i_rows:
            vectors = self._user_vectors([queries[r] for r in u2i_rows])
            found_lists = self._vector_source(
                vectors, u2i_rows, fetch("u2i"), excluded, queries, sampler=self.ann_sampler
            )
            for row, found in found_lists.items():
                lists[row]["u2i"] = found
        i2i_rows = [
            r for r, q in enumerate(queries) if "i2i" in quotas[r] and (len(q.seed_items) or len(q.history))
        ]
        if i2i_rows:
            seeds = {r: self._seeds(queries[r]) for r in i2i_rows}
            vectors = self._seed_vectors([seeds[r] for r in i2i_rows])
            # An item is its own nearest neighbour: never offer a seed back as its own i2i candidate.
            i2i_excluded = [
                np.union1d(excluded[r], seeds[r]) if r in seeds else excluded[r] for r in range(len(queries))
            ]
            found_lists = self._vector_source(vectors, i2i_rows, fetch("i2i"), i2i_excluded, queries)
            for row, found in found_lists.items():
                lists[row]["i2i"] = found
        covisit_fetch, popular_fetch = fetch("covisit"), fetch("popular")
        for row, query in enumerate(queries):
            if "covisit" in quotas[row] and (len(query.seed_items) or len(query.history)):
                lists[row]["covisit"] = self._covisit_source(query, covisit_fetch[row], excluded[row])
            if "popular" in quotas[row]:
                lists[row]["popular"] = self._popular_source(query, popular_fetch[row], excluded[row])
        return [_Gathered(quotas[row], excluded[row], lists[row]) for row in range(len(queries))]

    def _excluded(self, query: RecallQuery) -> np.ndarray:
        parts = [np.asarray(query.exclude_items, dtype=np.int64)]
        if query.exclude_history:
            parts.append(np.asarray(query.history, dtype=np.int64))
        return np.unique(np.concatenate(parts))

    # ------------------------------------------------------------------ user profiles

    def user_vectors(self, queries: Sequence[RecallQuery]) -> np.ndarray:
        """The user embeddings of ``queries`` (their histories, event types and scenarios): one
        user-tower run, as the u2i source computes them; float32 [len(queries), dim]."""
        return self._user_vectors(queries)

    @cached_property
    def category_centroids(self) -> AttributeCentroids:
        """Per category of ``category_names``: its items' embedding centroid (computed once)."""
        return AttributeCentroids.of(self.item_vectors, self.item_category, len(self.category_names))

    @cached_property
    def brand_centroids(self) -> AttributeCentroids:
        """Per brand of ``brand_names``: its items' embedding centroid (computed once)."""
        return AttributeCentroids.of(self.item_vectors, self.item_brand, len(self.brand_names))

    def nearest_attributes(
        self, queries: Sequence[RecallQuery], top_n: Sequence[int]
    ) -> list[NearestAttributes]:
        """Per query: the ``top_n`` category and brand centroids nearest its user embedding by
        cosine similarity; one user-tower run for the queries with a history (the others get
        empty lists)."""
        answers = [NearestAttributes.empty() for _ in queries]
        rows = [row for row, query in enumerate(queries) if len(query.history)]
        if not rows:
            return answers
        users = np.asarray(self.user_vectors([queries[row] for row in rows]), dtype=np.float32)
        users = users / np.maximum(np.linalg.norm(users, axis=1, keepdims=True), 1e-12)
        categories, brands = self.category_centroids, self.brand_centroids
        category_scores = users @ categories.vectors.T
        brand_scores = users @ brands.vectors.T
        for position, row in enumerate(rows):
            answers[row] = NearestAttributes(
                *categories.nearest(category_scores[position], top_n[row]),
                *brands.nearest(brand_scores[position], top_n[row]),
            )
        return answers


__all__ = [
    "SOURCES",
    "SOURCE_INDEX",
    "AnnSampler",
    "AttributeCentroids",
    "CandidateList",
    "NearestAttributes",
    "RecallEngine",
    "RecallQuery",
    "SourceList",
    "SourceLists",
    "UserTower",
]
