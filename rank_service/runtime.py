"""The serving core: scores candidates with the exported ranker on ONNX Runtime (no torch).

``RankRuntime.load`` picks the graph and execution provider for the device: on a GPU host the
FP16 fused-attention graph on the CUDA provider (TensorRT first when the build has it), with IO
binding; otherwise the CPU graph on the CPU provider. Thread counts are pinned and the session is
warmed up at load. ``score`` is batched over requests: one padded batch, one session run.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import onnxruntime as ort

from rank_service.features import (
    NUM_CANDIDATE_FEATURES,
    SOURCES,
    UNKNOWN_CANDIDATE_SCORE,
    PackedBatch,
    candidate_features,
    history_inputs,
    pack_batch,
)
from recsys.bundle import BundleError, read_manifest, resolve_bundle
from recsys.data.dataset import IdMap

log = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "gpu"]
# History positions reported per candidate in debug mode.
ATTENDED_TOP = 3


@dataclass
class RankQuery:
    """One request to rank: dense ids (candidates -1 = unknown) and recall's features."""

    history: np.ndarray
    event_types: np.ndarray | None
    scenario: int
    candidates: np.ndarray
    recall_scores: np.ndarray
    source_scores: np.ndarray  # [n, len(SOURCES)]
    source_mask: np.ndarray  # [n, len(SOURCES)] bool

    def __post_init__(self) -> None:
        self.candidates = np.asarray(self.candidates, dtype=np.int64).reshape(-1)
        n = len(self.candidates)
        self.history = np.asarray(self.history, dtype=np.int64).reshape(-1)
        self.recall_scores = np.asarray(self.recall_scores, dtype=np.float32).reshape(n)
        self.source_scores = np.asarray(self.source_scores, dtype=np.float32).reshape(n, len(SOURCES))
        self.source_mask = np.asarray(self.source_mask, dtype=bool).reshape(n, len(SOURCES))

    @classmethod
    def without_recall(cls, history: np.ndarray, scenario: int, candidates: np.ndarray) -> RankQuery:
        """A query whose candidates carry no recall features (tests, benchmarks)."""
        n = len(candidates)
        return cls(
            history=history,
            event_types=None,
            scenario=scenario,
            candidates=candidates,
            recall_scores=np.zeros(n, dtype=np.float32),
            source_scores=np.zeros((n, len(SOURCES)), dtype=np.float32),
            source_mask=np.zeros((n, len(SOURCES)), dtype=bool),
        )


def cuda_device_count() -> int:
    """CUDA devices the driver sees (0 without a driver), asked of libcuda directly (no torch)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    except OSError:
        return 0


def gpu_available() -> bool:
    """This onnxruntime build has the CUDA provider AND a CUDA device is present."""
    return "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0


def tensorrt_usable() -> bool:
    """TensorRT provider built in, its library loadable, and not turned off (RECSYS_TENSORRT=0)."""
    if os.environ.get("RECSYS_TENSORRT", "1") == "0":
        return False
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return False
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def preload_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels when the system has none (onnxruntime >= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as error:  # the system libraries may still be found by the provider
        log.warning("onnxruntime.preload_dlls failed: %s", error)


def resolve_device(device: str) -> Literal["cpu", "gpu"]:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, got {device!r}")
    if device == "gpu" and not gpu_available():
        raise RuntimeError(
            "device=gpu needs onnxruntime-gpu's CUDAExecutionProvider and a CUDA device "
            f"(providers: {ort.get_available_providers()}, CUDA devices: {cuda_device_count()})"
        )
    if device == "auto":
        return "gpu" if gpu_available() else "cpu"
    return device  # type: ignore[return-value]


def session_options(threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = max(1, threads or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    # Idle intra-op threads would otherwise spin for work, burning a core that the other services
    # on a small host need (measured: 44 ms of CPU per request at 5 req/s with spinning, 5 without).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def gpu_providers(max_history: int, max_candidates: int = 5000, max_batch: int = 64) -> list[Any]:
    """TensorRT (FP16, one dynamic-shape profile) when built in, then CUDA, then CPU fallback."""
    providers: list[Any] = []
    if tensorrt_usable():
        width = max_history
        shapes = {
            "min": (1, 1, 1),
            "opt": (1, width, 500),
            "max": (max_batch, width, max_candidates),
        }

        def profile(kind: str) -> str:
            batch, length, count = shapes[kind]
            return (
                f"history:{batch}x{length},history_events:{batch}x{length},scenario:{batch},"
                f"candidates:{batch}x{count},candidate_features:{batch}x{count}x{NUM_CANDIDATE_FEATURES}"
            )

        cache = Path(os.environ.get("RECSYS_TRT_CACHE", Path.home() / ".cache" / "recsys-trt"))
        providers.append(
            (
                "TensorrtExecutionProvider",
                {
                    "trt_fp16_enable": True,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                    "trt_profile_min_shapes": profile("min"),
                    "trt_profile_opt_shapes": profile("opt"),
                    "trt_profile_max_shapes": profile("max"),
                },
            )
        )
    providers.append(("CUDAExecutionProvider", {"device_id": 0}))
    providers.append("CPUExecutionProvider")
    return providers


class RankRuntime:
    """A loaded rank bundle: id map, scenarios and an ONNX Runtime session."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: dict[str, Any],
        items: IdMap,
        session: ort.InferenceSession,
        device: Literal["cpu", "gpu"],
        threads: int | None,
    ):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.items = items
        self.scenarios: list[str] = list(manifest["scenarios"])
        self.version: str = manifest["version"]
        self.max_history: int = int(manifest["max_history"])
        self.device = device
        self.threads = threads
        self.session = session
        self._outputs = [o.name for o in session.get_outputs()]
        self._explain_session: ort.InferenceSession | None = None
        if self.manifest.get("sources", list(SOURCES)) != list(SOURCES):
            raise BundleError(f"{bundle_dir}: sources {manifest.get('sources')} != {list(SOURCES)}")

    @classmethod
    def load(cls, bundle_dir: str | Path, device: str = "auto", threads: int | None = None) -> RankRuntime:
        """Load and verify a rank bundle (a folder of versions: its ``current`` one), pick graph +
        provider for ``device``, and warm the session up."""
        bundle_dir = resolve_bundle(bundle_dir)
        manifest = read_manifest(bundle_dir, "rank", verify=True)
        resolved = resolve_device(device)
        items = IdMap.load(bundle_dir / "items.txt")
        if len(items) != int(manifest["num_items"]):
            raise BundleError(
                f"{bundle_dir}: items.txt: {len(items)} item ids, manifest says {manifest['num_items']}"
            )
        graph = manifest["graphs"]["gpu" if resolved == "gpu" else "cpu"]
        options = session_options(threads)
        if resolved == "gpu":
            preload_cuda_libraries()
            providers = gpu_providers(int(manifest["max_history"]))
        else:
            providers = ["CPUExecutionProvider"]
        session = ort.InferenceSession(
            str(bundle_dir / graph["file"]),
            options,
            providers=providers,
            disabled_optimizers=list(graph.get("disabled_optimizers", [])),
        )
        if resolved == "gpu" and session.get_providers()[0] == "CPUExecutionProvider":
            if device == "gpu":
                raise RuntimeError(
                    f"device=gpu but the CUDA provider did not start: {session.get_providers()}"
                )
            log.warning("the CUDA provider did not start; falling back to the CPU graph")
            return cls.load(bundle_dir, device="cpu", threads=threads)
        runtime = cls(bundle_dir, manifest, items, session, resolved, threads)
        runtime.warm_up()
        log.info(
            "rank bundle %s loaded: %s on %s (%d items)",
            runtime.version,
            graph["file"],
            session.get_providers()[0],
            len(items),
        )
        return runtime

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def scenario_id(self, name: str) -> int:
        """Dense scenario id, -1 when the bundle does not know it."""
        try:
            return self.scenarios.index(name)
        except ValueError:
            return -1

    def warm_up(self) -> None:
        """Run the serving shapes once (allocations, kernel selection) before reporting healthy."""
        history = np.arange(min(len(self.items), self.max_history), dtype=np.int64)
        candidates = np.arange(min(len(self.items), 500), dtype=np.int64)
        self.score([RankQuery.without_recall(history, 0, candidates)])
        self.score([RankQuery.without_recall(history[:0], 0, candidates[:1])] * 2)

    # -- scoring ---------------------------------------------------------------------------
    def pack(self, queries: Sequence[RankQuery]) -> PackedBatch:
        """Model inputs for ``queries`` (features, truncation, padding) as the graph expects."""
        histories = [history_inputs(q.history, q.event_types, self.max_history) for q in queries]
        features = [candidate_features(q.recall_scores, q.source_scores, q.source_mask) for q in queries]
        return pack_batch(histories, [q.scenario for q in queries], [q.candidates for q in queries], features)

    def _run(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        if self.device == "gpu":
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            for name in outputs:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()
        return self.session.run(outputs, feeds)

    def _explainer(self) -> ort.InferenceSession:
        """A CPU session of the graph that outputs attention weights (the served ones do not)."""
        if "attention" in self._outputs:
            return self.session
        if self._explain_session is None:
            graphs = self.manifest["graphs"]
            graph = graphs.get("explain", graphs["cpu"])
            self._explain_session = ort.InferenceSession(
                str(self.bundle_dir / graph["file"]),
                session_options(self.threads),
                providers=["CPUExecutionProvider"],
                disabled_optimizers=list(graph.get("disabled_optimizers", [])),
            )
        return self._explain_session

    @overload
    def score(self, queries: Sequence[RankQuery], attention: Literal[False] = False) -> list[np.ndarray]: ...

    @overload
    def score(
        self, queries: Sequence[RankQuery], attention: Literal[True]
    ) -> list[tuple[np.ndarray, np.ndarray]]: ...

    def score(self, queries: Sequence[RankQuery], attention: bool = False):
        """Scores (float32, request order) per query; unknown candidates get UNKNOWN_CANDIDATE_SCORE.

        With ``attention=True`` each result is ``(scores, attended)``, ``attended`` [n, 3] int64:
        positions in ``query.history`` the candidate attended to most (-1 = none).
        """
        if not queries:
            return []
        batch = self.pack(queries)
        if attention:
            scores, weights = self._explainer().run(["scores", "attention"], batch.feeds())
        else:
            (scores,) = self._run(batch.feeds(), ["scores"])
            weights = None
        results = []
        for row, query in enumerate(queries):
            count = int(batch.candidate_counts[row])
            row_scores = scores[row, :count].astype(np.float32, copy=True)
            row_scores[query.candidates < 0] = UNKNOWN_CANDIDATE_SCORE
            if weights is None:
                results.append(row_scores)
            else:
                attended = self._attended_positions(
                    query, weights[row, :count], int(batch.history_lengths[row])
                )
                results.append((row_scores, attended))
        return results

    def _attended_positions(self, query: RankQuery, weights: np.ndarray, length: int) -> np.ndarray:
        """Top history positions per candidate from weights [n, 1 + L] (column 0: no-history)."""
        known = np.flatnonzero(query.history >= 0)[-self.max_history :] if length else np.zeros(0, np.int64)
        top = min(ATTENDED_TOP, length)
        attended = np.full((weights.shape[0], ATTENDED_TOP), -1, dtype=np.int64)
        if top == 0:
            return attended
        item_weights = weights[:, 1 : 1 + length]
        order = np.argsort(-item_weights, axis=1, kind="stable")[:, :top]
        attended[:, :top] = known[order]
        if (query.candidates < 0).any():
            attended[query.candidates < 0] = -1
        return attended
