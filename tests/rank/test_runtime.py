"""RankRuntime on an exported (untrained) bundle: unknown candidates, order independence,
history handling, debug positions, device selection, and the GPU path (skipped without a GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from rank_service.features import SOURCES, UNKNOWN_CANDIDATE_SCORE
from rank_service.runtime import RankQuery, RankRuntime, gpu_available
from recsys.bundle import BundleError


@pytest.fixture(scope="module")
def runtime(random_bundle) -> RankRuntime:
    return RankRuntime.load(random_bundle[1], device="cpu", threads=1)


def query(candidates, history=(1, 2, 3), scenario: int = 0, events=None) -> RankQuery:
    count = len(candidates)
    rng = np.random.default_rng(count)
    mask = rng.random((count, len(SOURCES))) < 0.5
    return RankQuery(
        history=np.asarray(history),
        event_types=None if events is None else np.asarray(events),
        scenario=scenario,
        candidates=np.asarray(candidates),
        recall_scores=rng.normal(size=count),
        source_scores=rng.normal(size=(count, len(SOURCES))) * mask,
        source_mask=mask,
    )


def test_unknown_candidates_get_the_defined_low_score_and_leave_others_unchanged(runtime):
    known = query([4, 9, 11])
    (scores,) = runtime.score([known])
    with_unknown = RankQuery(
        history=known.history,
        event_types=None,
        scenario=0,
        candidates=np.array([4, -1, 9, 11]),
        recall_scores=np.insert(known.recall_scores, 1, 0.0),
        source_scores=np.insert(known.source_scores, 1, 0.0, axis=0),
        source_mask=np.insert(known.source_mask, 1, False, axis=0),
    )
    (mixed,) = runtime.score([with_unknown])
    assert mixed[1] == UNKNOWN_CANDIDATE_SCORE
    assert np.abs(np.delete(mixed, 1) - scores).max() < 1e-5
    assert np.isfinite(mixed).all() and mixed[1] < scores.min()


def test_scores_follow_candidates_when_the_request_order_changes(runtime):
    forward = query([3, 8, 15, 21, 30])
    permutation = np.array([4, 2, 0, 3, 1])
    shuffled = RankQuery(
        history=forward.history,
        event_types=None,
        scenario=0,
        candidates=forward.candidates[permutation],
        recall_scores=forward.recall_scores[permutation],
        source_scores=forward.source_scores[permutation],
        source_mask=forward.source_mask[permutation],
    )
    a, b = runtime.score([forward, shuffled])
    assert np.abs(a[permutation] - b).max() < 1e-5


def test_unknown_history_items_are_skipped_and_long_histories_truncated(runtime):
    max_history = runtime.max_history
    (clean,) = runtime.score([query([5, 6], history=[1, 2, 3])])
    (noisy,) = runtime.score([query([5, 6], history=[-1, 1, -1, 2, 3])])
    assert np.abs(clean - noisy).max() < 1e-5
    recent = list(range(10, 10 + max_history))
    (long,) = runtime.score([query([5, 6], history=[40, 41, 42, *recent])])
    (cut,) = runtime.score([query([5, 6], history=recent)])
    assert np.abs(long - cut).max() < 1e-5


def test_scenario_and_events_change_scores(runtime):
    (home,) = runtime.score([query([5, 6, 7], scenario=0)])
    (cart,) = runtime.score([query([5, 6, 7], scenario=2)])
    (purchases,) = runtime.score([query([5, 6, 7], scenario=0, events=[4, 4, 4])])
    assert np.abs(home - cart).max() > 1e-4
    assert np.abs(home - purchases).max() > 1e-4


def test_attention_positions_point_into_the_history(runtime):
    history = [7, -1, 8, 9, 10]
    [(scores, attended)] = runtime.score([query([1, 2, -1], history=history)], attention=True)
    (plain,) = runtime.score([query([1, 2, -1], history=history)])
    assert np.allclose(scores, plain, atol=1e-6)
    assert attended.shape == (3, 3)
    assert set(attended[:2].ravel()) <= {0, 2, 3, 4}  # position 1 is an unknown item
    assert (attended[2] == -1).all()  # unknown candidate
    [(_, empty)] = runtime.score([query([1, 2], history=[])], attention=True)
    assert (empty == -1).all()


def test_device_choice(random_bundle):
    if not gpu_available():
        with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
            RankRuntime.load(random_bundle[1], device="gpu")
    with pytest.raises(ValueError, match="device"):
        RankRuntime.load(random_bundle[1], device="tpu")
    runtime = RankRuntime.load(random_bundle[1], device="auto", threads=1)
    assert runtime.device == ("gpu" if gpu_available() else "cpu")


def test_missing_bundle_is_a_bundle_error(tmp_path):
    with pytest.raises(BundleError):
        RankRuntime.load(tmp_path, device="cpu")


@pytest.mark.gpu
def test_gpu_runtime_matches_cpu_runtime(random_bundle, runtime):
    if not gpu_available():
        pytest.skip("no CUDA execution provider in this onnxruntime build")
    gpu = RankRuntime.load(random_bundle[1], device="gpu", threads=1)
    assert gpu.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
    queries = [query([3, 8, 15, 21]), query([1, 2], history=[]), query(list(range(40)), history=range(30))]
    for on_gpu, on_cpu in zip(gpu.score(queries), runtime.score(queries), strict=True):
        assert np.abs(on_gpu - on_cpu).max() <= 0.05 * max(1.0, float(np.abs(on_cpu).max()))
    [(_, attended)] = gpu.score([query([3, 8])], attention=True)  # debug falls back to the CPU graph
    assert attended.shape == (2, 3)
