"""Hot swap of real recall and rank servers under load, over versioned folders of the tiny bundles.

Each published version differs in content the answer shows (recall: the most popular item; rank:
a constant added to every score), so a response whose version and content disagree would be a
mixed answer. Waits are bounded polls; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from gateway.config import DEFAULT_SCENARIOS, GatewayConfig
from gateway.server import serve as serve_gateway
from rank_service.config import RankConfig
from rank_service.runtime import RankRuntime
from rank_service.server import serve as serve_rank
from recall_service.config import RecallConfig
from recall_service.engine import RecallEngine
from recall_service.server import serve as serve_recall
from recsys.bundle import BundleError, activate_version, publish_bundle, rollback, write_manifest
from recsys.serving.auth import SCOPES, BearerTokenInterceptor, write_tokens_file
from recsys.serving.metrics import new_registry
from recsys.serving.wire import INDEX, SCORE, catalog_fingerprint, pack
from recsys.v1 import gateway_pb2, gateway_pb2_grpc, rank_pb2, rank_pb2_grpc, recall_pb2, recall_pb2_grpc
from tests.stack import loopback_serving

pytestmark = pytest.mark.integration

POLL_S = 0.1
WAIT_S = 120.0  # a safety bound on every wait (the 2-core CI machine may be slow), not an assertion
VERSIONS = 6  # v0 served at start, then 5 published
RANK_OFFSET = 100.0  # version i adds i * RANK_OFFSET to every rank score
MANIFEST_CORE = ("kind", "version", "schema_version", "data_fingerprint", "created_unix", "files")
MANIFEST_DERIVED = ("file_digests", "catalog")


def republish(source: Path, target: Path, version: str, mutate: Callable[[Path], None] | None = None) -> Path:
    """A copy of ``source`` with manifest version ``version``, changed by ``mutate``, re-hashed."""
    shutil.copytree(source, target)
    if mutate is not None:
        mutate(target)
    manifest = json.loads((target / "manifest.json").read_text())
    metadata = {k: v for k, v in manifest.items() if k not in MANIFEST_CORE + MANIFEST_DERIVED}
    write_manifest(target, manifest["kind"], version, manifest["data_fingerprint"], **metadata)
    return target


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def popular_first(index: int) -> Callable[[Path], None]:
    """Make the item at popularity rank ``index`` the most popular one (recall's version marker)."""

    def mutate(folder: Path) -> None:
        order = np.load(folder / "popularity_global.npy")
        counts = np.load(folder / "popularity_counts.npy")
        marker = order[index]
        np.save(folder / "popularity_global.npy", np.concatenate([[marker], np.delete(order, index)]))
        counts[marker] = counts.max() + 1
        np.save(folder / "popularity_counts.npy", counts)

    return mutate


def recall_marker(folder: Path) -> int:
    return int(np.load(folder / "popularity_global.npy")[0])


def offset_scores(offset: float) -> Callable[[Path], None]:
    """Add ``offset`` to the served (CPU) graph's scores (rank's version marker)."""

    def mutate(folder: Path) -> None:
        import onnx
        from onnx import helper, numpy_helper

        graph_file = json.loads((folder / "manifest.json").read_text())["graphs"]["cpu"]["file"]
        model = onnx.load(str(folder / graph_file))
        for node in model.graph.node:
            for position, name in enumerate(node.output):
                if name == "scores":
                    node.output[position] = "scores_before_offset"
        model.graph.initializer.append(numpy_helper.from_array(np.array(offset, np.float32), "score_offset"))
        model.graph.node.append(helper.make_node("Add", ["scores_before_offset", "score_offset"], ["scores"]))
        onnx.save(model, str(folder / graph_file))

    return mutate


@dataclass
class Published:
    """Versioned roots of both services and what each version's answers must show."""

    recall_root: Path
    rank_root: Path
    recall_staged: list[Path]
    rank_staged: list[Path]
    recall_markers: dict[str, int] = field(default_factory=dict)  # version -> most popular item
    rank_offsets: dict[str, float] = field(default_factory=dict)  # version -> score offset


@pytest.fixture
def published(recall_bundle: Path, rank_bundle: Path, tmp_path: Path) -> Published:
    staging = tmp_path / "staging"
    result = Published(tmp_path / "recall", tmp_path / "rank", [], [])
    for i in range(VERSIONS):
        recall_version, rank_version = f"recall-v{i}", f"rank-v{i}"
        recall_dir = republish(recall_bundle, staging / recall_version, recall_version, popular_first(i))
        rank_dir = republish(
            rank_bundle, staging / rank_version, rank_version, offset_scores(i * RANK_OFFSET)
        )
        result.recall_staged.append(recall_dir)
        result.rank_staged.append(rank_dir)
        result.recall_markers[recall_version] = recall_marker(recall_dir)
        result.rank_offsets[rank_version] = i * RANK_OFFSET
    assert len(set(result.recall_markers.values())) == VERSIONS
    publish_bundle(result.recall_staged[0], result.recall_root)
    publish_bundle(result.rank_staged[0], result.rank_root)
    return result


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up = loop.time() + WAIT_S
    while not condition():
        if loop.time() > give_up:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


def reloads(registry: CollectorRegistry, service: str, outcome: str) -> float:
    value = registry.get_sample_value("recsys_bundle_reload_total", {"service": service, "outcome": outcome})
    return value or 0.0


@dataclass
class Traffic:
    """What the load generators saw."""

    recall_versions: list[str] = field(default_factory=list)
    rank_versions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    inconsistent: list[str] = field(default_factory=list)

    def latest(self, service: str) -> str | None:
        seen = self.recall_versions if service == "recall" else self.rank_versions
        return seen[-1] if seen else None


async def test_five_swaps_under_load_corrupt_refused_and_rollback(
    published: Published, synthetic_dataset
) -> None:
    registry = new_registry(process_metrics=False)
    rank_registry = new_registry(process_metrics=False)
    recall = await serve_recall(
        RecallConfig(
            serving=loopback_serving(), bundle=published.recall_root, device="cpu", bundle_poll_s=POLL_S
        ),
        registry=registry,
    )
    rank = await serve_rank(
        RankConfig(
            serving=loopback_serving(), bundle=published.rank_root, device="cpu", bundle_poll_s=POLL_S
        ),
        registry=rank_registry,
    )
    catalog = catalog_fingerprint(synthetic_dataset.items.ids)
    traffic = Traffic()
    stop = asyncio.Event()
    candidates = np.arange(20)
    history = np.arange(20, 26)
    rank_request = rank_pb2.RankRequest(
        catalog=catalog,
        scenario="home",
        candidate_items=pack(candidates, INDEX),
        history_items=pack(history, INDEX),
        recall_scores=pack(np.linspace(1.0, 0.1, len(candidates)), SCORE),
    )
    recall_request = recall_pb2.RecallRequest(
        catalog=catalog, scenario="home", k=5, sources=[recall_pb2.SourceQuota(source="popular", k=5)]
    )
    try:
        async with (
            grpc.aio.insecure_channel(recall.address) as recall_channel,
            grpc.aio.insecure_channel(rank.address) as rank_channel,
        ):
            recall_stub = recall_pb2_grpc.RecallServiceStub(recall_channel)
            rank_stub = rank_pb2_grpc.RankServiceStub(rank_channel)
            first = await rank_stub.Rank(rank_request, timeout=30)
            assert first.model_version == "rank-v0"
            base_scores = np.frombuffer(first.scores, SCORE)

            async def recall_load() -> None:
                while not stop.is_set():
                    try:
                        answer = await recall_stub.Recall(recall_request, timeout=30)
                    except grpc.aio.AioRpcError as error:
                        traffic.errors.append(f"recall {error.code().name}: {error.details()}")
                        continue
                    top = int(np.frombuffer(answer.items, INDEX)[0])
                    expected = published.recall_markers.get(answer.model_version)
                    if expected != top or answer.catalog != catalog:
                        traffic.inconsistent.append(f"recall {answer.model_version}: top {top}")
                    traffic.recall_versions.append(answer.model_version)

            async def rank_load() -> None:
                while not stop.is_set():
                    try:
                        answer = await rank_stub.Rank(rank_request, timeout=30)
                    except grpc.aio.AioRpcError as error:
                        traffic.errors.append(f"rank {error.code().name}: {error.details()}")
                        continue
                    offset = published.rank_offsets.get(answer.model_version)
                    scores = np.frombuffer(answer.scores, SCORE)
                    if offset is None or not np.allclose(scores, base_scores + offset, atol=1e-2):
                        traffic.inconsistent.append(f"rank {answer.model_version}: {scores[:3]}")
                    traffic.rank_versions.append(answer.model_version)

            async def health_watch() -> None:
                stubs = {
                    "recall": health_pb2_grpc.HealthStub(recall_channel),
                    "rank": health_pb2_grpc.HealthStub(rank_channel),
                }
                while not stop.is_set():
                    for service, health in stubs.items():
                        status = (await health.Check(health_pb2.HealthCheckRequest(), timeout=30)).status
                        if status != health_pb2.HealthCheckResponse.SERVING:
                            traffic.errors.append(f"{service} health {status}")
                    await asyncio.sleep(0.05)

            workers = [asyncio.ensure_future(recall_load()) for _ in range(3)]
            workers += [asyncio.ensure_future(rank_load()) for _ in range(3)]
            workers.append(asyncio.ensure_future(health_watch()))
            try:
                for i in range(1, VERSIONS):
                    publish_bundle(published.recall_staged[i], published.recall_root)
                    publish_bundle(published.rank_staged[i], published.rank_root)
                    await wait_until(lambda i=i: traffic.latest("recall") == f"recall-v{i}", f"recall-v{i}")
                    await wait_until(lambda i=i: traffic.latest("rank") == f"rank-v{i}", f"rank-v{i}")
                assert reloads(registry, "recall", "swapped") == VERSIONS - 1
                assert reloads(rank_registry, "rank", "swapped") == VERSIONS - 1

                # a corrupt version: one byte flipped after hashing (at rest or in transit)
                last = VERSIONS - 1
                for root, staged, name, bad_file in (
                    (
                        published.recall_root,
                        published.recall_staged[last],
                        f"recall-v{VERSIONS}",
                        "index.faiss",
                    ),
                    (published.rank_root, published.rank_staged[last], f"rank-v{VERSIONS}", "items.txt"),
                ):
                    republish(staged, root / name, name)
                    flip_byte(root / name / bad_file)
                    activate_version(root, name)
                await wait_until(lambda: reloads(registry, "recall", "refused") == 1, "recall refusal")
                await wait_until(lambda: reloads(rank_registry, "rank", "refused") == 1, "rank refusal")
                served_before = len(traffic.recall_versions), len(traffic.rank_versions)
                await wait_until(
                    lambda: (
                        len(traffic.recall_versions) > served_before[0] + 5
                        and len(traffic.rank_versions) > served_before[1] + 5
                    ),
                    "answers after the refusal",
                )
                assert traffic.latest("recall") == f"recall-v{last}"
                assert traffic.latest("rank") == f"rank-v{last}"

                # rollback: current -> v5 (already served: no swap), again -> v4 (swapped back)
                for root in (published.recall_root, published.rank_root):
                    assert rollback(root).endswith(f"-v{last}")
                    assert rollback(root).endswith(f"-v{last - 1}")
                await wait_until(lambda: traffic.latest("recall") == f"recall-v{last - 1}", "recall rollback")
                await wait_until(lambda: traffic.latest("rank") == f"rank-v{last - 1}", "rank rollback")
                assert reloads(registry, "recall", "swapped") == VERSIONS
                assert reloads(rank_registry, "rank", "swapped") == VERSIONS
                assert reloads(registry, "recall", "refused") == 1
            finally:
                stop.set()
                await asyncio.gather(*workers)
        assert traffic.errors == []
        assert traffic.inconsistent == []
        assert set(traffic.recall_versions) == set(published.recall_markers)
        assert set(traffic.rank_versions) == set(published.rank_offsets)
        info = registry.get_sample_value(
            "recsys_bundle_info",
            {"service": "recall", "kind": "recall", "version": f"recall-v{VERSIONS - 2}"},
        )
        assert info == 1.0
    finally:
        await recall.stop(grace=0)
        await rank.stop(grace=0)


def rename_items(suffix: str) -> Callable[[Path], None]:
    """Another catalog: every item id gets ``suffix`` (same items, different ids)."""

    def mutate(folder: Path) -> None:
        ids = (folder / "items.txt").read_text().splitlines()
        (folder / "items.txt").write_text("".join(f"{item}{suffix}\n" for item in ids))

    return mutate


async def test_gateway_follows_a_catalog_change_of_recall_then_rank(
    recall_bundle: Path, rank_bundle: Path, tmp_path: Path
) -> None:
    staging, roots = tmp_path / "staging", {"recall": tmp_path / "recall", "rank": tmp_path / "rank"}
    for kind, source in (("recall", recall_bundle), ("rank", rank_bundle)):
        publish_bundle(republish(source, staging / f"{kind}-a", f"{kind}-a"), roots[kind])
        republish(source, staging / f"{kind}-b", f"{kind}-b", rename_items("~b"))
    recall = await serve_recall(
        RecallConfig(serving=loopback_serving(), bundle=roots["recall"], device="cpu", bundle_poll_s=POLL_S)
    )
    rank = await serve_rank(
        RankConfig(serving=loopback_serving(), bundle=roots["rank"], device="cpu", bundle_poll_s=POLL_S)
    )
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("test", "swap-token", SCOPES)])
    gateway = await serve_gateway(
        GatewayConfig(
            serving=loopback_serving(),
            scenarios_path=DEFAULT_SCENARIOS,
            recall_address=recall.address,
            rank_address=rank.address,
            sqlite_path=tmp_path / "history.sqlite3",
            auth_tokens_file=tokens,
            http_enabled=False,  # only the gRPC pipeline is under test
        )
    )
    request = gateway_pb2.RecommendRequest(user_id="swap-user", scenario="home", num_items=10)
    seen: list[gateway_pb2.RecommendResponse] = []
    try:
        channel = grpc.aio.insecure_channel(
            gateway.address, interceptors=[BearerTokenInterceptor("swap-token")]
        )
        async with channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)

            async def recommend_until(condition: Callable[[gateway_pb2.RecommendResponse], bool], what: str):
                loop = asyncio.get_running_loop()
                give_up = loop.time() + WAIT_S
                while True:
                    response = await stub.Recommend(request, timeout=30)
                    seen.append(response)
                    if condition(response):
                        return response
                    if loop.time() > give_up:
                        raise AssertionError(f"gave up waiting for {what}: {response.degraded_reasons}")
                    await asyncio.sleep(0.05)

            before = await recommend_until(lambda r: len(r.items) == 10, "a first answer")
            assert not any(item.item_id.endswith("~b") for item in before.items)

            publish_bundle(staging / "recall-b", roots["recall"])  # recall moves to catalog b first
            moved = await recommend_until(
                lambda r: "rank_catalog_mismatch" in r.degraded_reasons, "rank flagged on the old catalog"
            )
            assert moved.items and all(item.item_id.endswith("~b") for item in moved.items)

            publish_bundle(staging / "rank-b", roots["rank"])
            after = await recommend_until(
                lambda r: not r.degraded and "rank=rank-b" in r.model_version, "both on catalog b"
            )
            assert len(after.items) == 10 and all(item.item_id.endswith("~b") for item in after.items)
            assert "recall=recall-b" in after.model_version
    finally:
        await gateway.stop(0)
        await recall.stop(grace=0)
        await rank.stop(grace=0)


def test_engine_and_runtime_refuse_corrupt_or_inconsistent_bundles(
    recall_bundle: Path, rank_bundle: Path, tmp_path: Path
) -> None:
    flipped = republish(recall_bundle, tmp_path / "flipped", "recall-flipped")
    flip_byte(flipped / "item_vectors.npy")
    with pytest.raises(BundleError, match=r"item_vectors\.npy: sha256 differs"):
        RecallEngine.load(flipped, device="cpu", threads=1)

    def fewer_bids(folder: Path) -> None:
        np.save(folder / "item_bid.npy", np.load(folder / "item_bid.npy")[:-1])

    short = republish(recall_bundle, tmp_path / "short", "recall-short", fewer_bids)
    with pytest.raises(BundleError, match=r"item_bid\.npy: \d+ rows, items\.txt has"):
        RecallEngine.load(short, device="cpu", threads=1)

    def drop_item(folder: Path) -> None:
        ids = (folder / "items.txt").read_text().splitlines()[:-1]
        (folder / "items.txt").write_text("".join(f"{item}\n" for item in ids))

    for source, loader in ((recall_bundle, RecallEngine.load), (rank_bundle, RankRuntime.load)):
        fewer = republish(source, tmp_path / f"fewer-{source.name}", "fewer", drop_item)
        with pytest.raises(BundleError, match=r"items\.txt: \d+ item ids"):
            loader(fewer, device="cpu", threads=1)

    onnx_flipped = republish(rank_bundle, tmp_path / "rank-flipped", "rank-flipped")
    graph = json.loads((onnx_flipped / "manifest.json").read_text())["graphs"]["cpu"]["file"]
    flip_byte(onnx_flipped / graph)
    with pytest.raises(BundleError, match=graph.replace(".", r"\.")):
        RankRuntime.load(onnx_flipped, device="cpu", threads=1)


def test_a_batch_spanning_a_swap_runs_each_job_on_the_bundle_it_was_validated_against(
    published: Published,
) -> None:
    from recall_service.engine import RecallQuery
    from recall_service.servicer import RecallJob, RecallModel, run_recall_jobs

    old, new = (RecallModel(RecallEngine.load(published.recall_staged[i], "cpu", 1)) for i in (0, 1))
    query = RecallQuery(history=np.zeros(0, np.int64), quotas={"popular": 5}, k=5)
    answers = run_recall_jobs([RecallJob(old, query), RecallJob(new, query), RecallJob(old, query)])
    tops = [int(answer.items[0]) for answer in answers]
    markers = published.recall_markers
    assert tops == [markers["recall-v0"], markers["recall-v1"], markers["recall-v0"]]
