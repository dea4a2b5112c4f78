"""Live ANN quality: a small share of real u2i searches is checked against exact search.

The batcher thread hands each u2i search to :meth:`AnnQualityMonitor.offer`, which keeps a
``sample_rate`` share of the queries (their vector, the ANN's ids and filter) in a bounded queue
and never blocks: when the queue is full the sample is dropped and counted. One daemon thread,
one Faiss thread, at low priority where the OS allows it, takes small batches from the queue,
runs exact inner-product search over the same item vectors (``faiss.knn`` over the engine's own
array, no copy, no second index) within the same filter and shard range, and exports the rolling
mean recall@k of the ANN over the last ``window`` samples:

- ``recsys_recall_live_ann_recall{k}`` gauge (k in :data:`LIVE_RECALL_KS` up to the search depth),
- ``recsys_recall_live_ann_samples_total`` samples evaluated,
- ``recsys_recall_live_ann_dropped_total`` samples dropped because the queue was full.

The monitor follows the served engine (:meth:`AnnQualityMonitor.follow`, called on each hot
swap): samples of any other engine are discarded, and the window restarts with the new bundle.
An exact index (Flat) reads 1.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import faiss
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from recall_service.engine import RecallEngine
from recsys.serving.metrics import get_or_create
from recsys.serving.reload import Stoppable
from recsys.serving.thread_names import name_os_thread

log = logging.getLogger(__name__)

LIVE_RECALL_KS = (10, 100)  # recall@k exported for each k the search went as deep as
DEFAULT_WINDOW = 200
QUEUE_SIZE = 256
BATCH = 16  # samples per exact search: below Faiss's BLAS threshold (20), so one thread computes
LOW_PRIORITY = 10  # the worker thread's niceness (0 normal, 19 lowest)


@dataclass
class _Sample:
    engine: RecallEngine
    vector: np.ndarray  # float32 [D]
    ids: np.ndarray  # int64 [K]: the ANN's answer, -1 padded
    allowed: np.ndarray | None  # the search's filter (item ids), None = the engine's whole range


class AnnQualityMetrics:
    """The live ANN quality series (registered once per registry)."""

    def __init__(self, registry: CollectorRegistry):
        self.recall: Gauge = get_or_create(
            registry,
            "recsys_recall_live_ann_recall",
            lambda: Gauge(
                "recsys_recall_live_ann_recall",
                "Recall@k of the ANN index against exact search on sampled live u2i queries "
                "(rolling mean over the last samples)",
                ["k"],
                registry=registry,
            ),
        )
        self.samples: Counter = get_or_create(
            registry,
            "recsys_recall_live_ann_samples",
            lambda: Counter(
                "recsys_recall_live_ann_samples",
                "Sampled live u2i queries checked against exact search",
                registry=registry,
            ),
        )
        self.dropped: Counter = get_or_create(
            registry,
            "recsys_recall_live_ann_dropped",
            lambda: Counter(
                "recsys_recall_live_ann_dropped",
                "Sampled live u2i queries dropped because the check's queue was full",
                registry=registry,
            ),
        )


class AnnQualityMonitor:
    """Samples u2i searches of the engine it follows and measures their recall off the request path."""

    def __init__(
        self,
        registry: CollectorRegistry,
        sample_rate: float,
        window: int = DEFAULT_WINDOW,
        ks: tuple[int, ...] = LIVE_RECALL_KS,
        queue_size: int = QUEUE_SIZE,
        seed: int | None = None,
    ):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.sample_rate = sample_rate
        self.ks = tuple(sorted(ks))
        self.metrics = AnnQualityMetrics(registry)
        self._windows: dict[int, deque[float]] = {k: deque(maxlen=window) for k in self.ks}
        self._queue: queue.Queue[_Sample | None] = queue.Queue(maxsize=queue_size)
        self._rng = np.random.default_rng(seed)
        self._engine: RecallEngine | None = None  # the served one: only its samples count
        self._window_engine: RecallEngine | None = None  # whose samples the windows hold
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._closer: asyncio.Future[None] | None = None
        self.evaluated = 0  # samples evaluated (what the counter counts, for tests and logs)

    def follow(self, engine: RecallEngine) -> None:
        """Sample ``engine`` from now on (the served one); the previous engine is no longer sampled."""
        previous, self._engine = self._engine, engine
        if previous is not None and previous is not engine:
            previous.ann_sampler = None
        engine.ann_sampler = self

    def offer(
        self, engine: RecallEngine, vectors: np.ndarray, ids: np.ndarray, allowed: np.ndarray | None
    ) -> None:
        """Keep a ``sample_rate`` share of a batch of u2i searches (queries ``vectors``, answers
        ``ids``) for checking; never blocks (a full queue drops the sample)."""
        if self._closed or engine is not self._engine:
            return
        for row in np.flatnonzero(self._rng.random(len(ids)) < self.sample_rate).tolist():
            sample = _Sample(engine, np.array(vectors[row], dtype=np.float32), ids[row].copy(), allowed)
            try:
                self._queue.put_nowait(sample)
            except queue.Full:
                self.metrics.dropped.inc()
                continue
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._work, name="ann-quality", daemon=True)
                    self._thread.start()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop sampling; the worker finishes the batch in hand and exits."""
        self._closed = True
        if self._engine is not None and self._engine.ann_sampler is self:
            self._engine.ann_sampler = None
        thread = self._thread
        if thread is not None:
            with contextlib.suppress(queue.Full):  # full: the worker sees _closed after its batch
                self._queue.put(None, timeout=timeout)
            thread.join(timeout)

    def close_with(self, running: Stoppable) -> None:
        """Close once ``running`` (the server) has stopped."""

        async def close_after() -> None:
            await running.wait_for_termination()
            await asyncio.to_thread(self.close)

        self._closer = asyncio.ensure_future(close_after())

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until every queued sample was evaluated (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def recall(self, k: int) -> float | None:
        """The rolling mean recall@k now (None before any sample reached depth k)."""
        window = self._windows.get(k)
        return float(np.mean(window)) if window else None

    # ------------------------------------------------------------------ the worker thread

    def _work(self) -> None:
        name_os_thread()
        faiss.omp_set_num_threads(1)  # per calling thread: this one never competes with the batcher
        # Linux threads have their own niceness; elsewhere the thread keeps the process's priority.
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY)
        while not self._closed:
            batch = [self._queue.get()]
            while len(batch) < BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._evaluate([sample for sample in batch if sample is not None])
            except Exception:  # a bad sample must not end the monitor
                log.exception("live ANN quality check failed")
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _evaluate(self, samples: list[_Sample]) -> None:
        current = self._engine
        samples = [s for s in samples if s.engine is current]
        if not samples:
            return
        if self._window_engine is not current:  # a new bundle: its own window
            for window in self._windows.values():
                window.clear()
            self._window_engine = current
        groups: dict[int, list[_Sample]] = {}
        for sample in samples:  # one exact search per filter (most samples have none)
            groups.setdefault(id(sample.allowed), []).append(sample)
        for group in groups.values():
            truth = self._exact(group)
            for sample, true_ids in zip(group, truth, strict=True):
                self._record(sample.ids, true_ids)
        for k, window in self._windows.items():
            if window:
                self.metrics.recall.labels(str(k)).set(float(np.mean(window)))

    def _exact(self, samples: list[_Sample]) -> np.ndarray:
        """Exact top-K ids [len(samples), K] over the engine's item vectors, same filter and range."""
        engine = samples[0].engine
        allowed = samples[0].allowed
        depth = max(len(s.ids) for s in samples)
        queries = np.stack([s.vector for s in samples])
        if allowed is not None:
            candidates = engine.item_vectors[allowed]  # a filter's items (a copy, usually small)
            ids = allowed
        else:
            start, end = engine.item_range or (0, engine.num_items)
            candidates = engine.item_vectors[start:end]  # a view: no copy
            ids = np.arange(start, end, dtype=np.int64)
        depth = min(depth, len(ids))
        _, positions = faiss.knn(
            np.ascontiguousarray(queries, dtype=np.float32),
            np.ascontiguousarray(candidates, dtype=np.float32),
            depth,
            metric=faiss.METRIC_INNER_PRODUCT,
        )
        return np.where(positions >= 0, ids[np.maximum(positions, 0)], -1)

    def _record(self, found: np.ndarray, truth: np.ndarray) -> None:
        self.evaluated += 1
        self.metrics.samples.inc()
        for k, window in self._windows.items():
            if k > len(found):
                continue  # the search did not go that deep
            true_top = truth[:k]
            true_top = true_top[true_top >= 0]
            if true_top.size == 0:
                continue
            window.append(np.intersect1d(found[:k], true_top).size / true_top.size)
