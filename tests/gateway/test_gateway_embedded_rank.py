"""The ranker inside the gateway's process (``recsys.app.inprocess --rank-bundle``), recall over gRPC.

Served against the three-process stack on the same bundles and the same stored history, every
shipped scenario answers the same items in the same order with the same versions; a gateway with
neither bundle is refused at once; the in-process ranker takes the rank service's settings under
``RECSYS_RANK_*`` / ``--rank-*`` and hot-swaps a new bundle version as the rank service does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from gateway.config import DEFAULT_SCENARIOS, GatewayConfig
from rank_service.config import RankConfig
from recsys.app.inprocess import main as inprocess_main
from recsys.app.inprocess import parse_args, serve_inprocess
from recsys.bundle import publish_bundle
from recsys.serving.auth import BearerTokenInterceptor
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.test_gateway_e2e import log_history, recommend, user_history
from tests.serving.test_serving_hot_swap import republish
from tests.stack import STACK_TOKEN, RunningStack, loopback_serving, running_stack

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("three")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(recall_bundle: Path, rank_bundle: Path, stack_dir: Path) -> AsyncIterator[RunningStack]:
    async with running_stack(recall_bundle, rank_bundle, stack_dir) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedded_rank_gateway(stack: RunningStack, stack_dir: Path, rank_bundle: Path, tmp_path_factory):
    """A second gateway: the ranker in its own process, the three-process stack's recall over gRPC."""
    folder = tmp_path_factory.mktemp("embedded-rank")
    config = GatewayConfig(
        serving=loopback_serving(),
        scenarios_path=DEFAULT_SCENARIOS,
        recall_address=stack.recall_address,
        rank_address="127.0.0.1:1",  # nothing listens here: rank must never be called over gRPC
        sqlite_path=folder / "history.sqlite3",
        auth_tokens_file=stack_dir / "auth-tokens.json",  # running_stack's: its token works here too
    )
    gateway = await serve_inprocess(config, None, RankConfig.embedded(rank_bundle, "cpu"))
    try:
        yield gateway
    finally:
        await gateway.stop(0)


async def test_every_scenario_serves_what_the_three_process_stack_serves(
    stack: RunningStack, embedded_rank_gateway, synthetic_dataset
):
    dataset = synthetic_dataset
    history = user_history(dataset, 3)
    viewed = history[-1].item_id
    category = dataset.catalog.category_names[int(dataset.catalog.category[dataset.items.dense(viewed)])]
    requests = [
        recommend("home", user="embedded", debug=True),
        recommend("item_detail", user="embedded", items=[viewed]),
        recommend("cart", user="embedded", items=[viewed]),
        recommend("category", user="embedded", category=category),
        recommend("ads", user="embedded", n=5),
    ]
    answers: dict[str, list[gateway_pb2.RecommendResponse]] = {}
    for name, address in (("three", stack.gateway_address), ("embedded", embedded_rank_gateway.address)):
        interceptors = [BearerTokenInterceptor(STACK_TOKEN)]
        async with grpc.aio.insecure_channel(address, interceptors=interceptors) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            await log_history(stub, "embedded", history)
            answers[name] = [await stub.Recommend(request, timeout=30) for request in requests]
    for three, embedded in zip(answers["three"], answers["embedded"], strict=True):
        assert not embedded.degraded, embedded.degraded_reasons
        assert [i.item_id for i in embedded.items] == [i.item_id for i in three.items]
        assert [i.score for i in embedded.items] == pytest.approx([i.score for i in three.items], abs=1e-5)
        assert embedded.model_version == three.model_version
        # debug (home): the ranker's attended history items come back from the in-process ranker too
        assert [list(i.attended_item_ids) for i in embedded.items] == [
            list(i.attended_item_ids) for i in three.items
        ]


async def test_a_gateway_without_any_bundle_is_refused(tmp_path):
    config = GatewayConfig(
        serving=loopback_serving(), sqlite_path=tmp_path / "h.db", allow_unauthenticated=True
    )
    with pytest.raises(ValueError, match="recall bundle, a rank bundle or both"):
        await serve_inprocess(config, None, None)
    with pytest.raises(SystemExit) as exited:
        inprocess_main([])
    assert exited.value.code == 2


async def test_in_process_stages_take_their_services_settings_under_their_prefix(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    rank_bundle: Path,
    recall_bundle: Path,
) -> None:
    """``RECSYS_RANK_*`` / ``--rank-*`` (and ``--recall-*``) reach the in-process stage's config;
    a flag beats its variable; a bad value exits with a usage error naming the setting."""
    monkeypatch.setenv("RECSYS_ALLOW_UNAUTHENTICATED", "1")
    monkeypatch.setenv("RECSYS_RANK_BUNDLE", str(rank_bundle))
    monkeypatch.setenv("RECSYS_RANK_THREADS", "2")
    monkeypatch.setenv("RECSYS_RANK_MAX_BATCH", "8")
    recall, rank, gateway = parse_args(["--rank-max-wait-ms", "1.5"])
    assert recall is None and rank is not None
    assert (rank.bundle, rank.threads, rank.max_batch, rank.max_wait_ms) == (rank_bundle, 2, 8, 1.5)
    assert rank.bundle_poll_s == RankConfig.embedded(rank_bundle).bundle_poll_s  # the service's default
    assert gateway.allow_unauthenticated

    recall, rank, _ = parse_args(
        [
            "--recall-bundle",
            str(recall_bundle),
            "--recall-threads",
            "3",
            "--rank-threads",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert recall is not None and (recall.threads, recall.device) == (3, "cpu")
    assert rank is not None and (rank.threads, rank.device) == (1, "cpu")

    monkeypatch.setenv("RECSYS_RANK_THREADS", "many")
    with pytest.raises(SystemExit) as exited:
        parse_args([])
    assert exited.value.code == 2 and "RECSYS_RANK_THREADS" in capsys.readouterr().err
    monkeypatch.setenv("RECSYS_RANK_THREADS", "1")
    with pytest.raises(SystemExit) as exited:
        parse_args(["--rank-max-batch", "0"])
    assert exited.value.code == 2 and "max_batch" in capsys.readouterr().err


async def test_the_in_process_ranker_swaps_in_a_new_bundle_version(
    stack: RunningStack, stack_dir: Path, rank_bundle: Path, tmp_path: Path
) -> None:
    """A new version activated in the ranker's versions folder is loaded, verified, warmed and
    served by the gateway that runs the ranker, with no degraded answer on the way."""
    root = tmp_path / "rank-versions"
    publish_bundle(republish(rank_bundle, tmp_path / "staging-1", "embedded-v1"), root)
    config = GatewayConfig(
        serving=loopback_serving(),
        scenarios_path=DEFAULT_SCENARIOS,
        recall_address=stack.recall_address,
        rank_address="127.0.0.1:1",
        sqlite_path=tmp_path / "history.sqlite3",
        auth_tokens_file=stack_dir / "auth-tokens.json",
    )
    gateway = await serve_inprocess(config, None, RankConfig.embedded(root, "cpu", bundle_poll_s=0.1))
    try:
        interceptors = [BearerTokenInterceptor(STACK_TOKEN)]
        async with grpc.aio.insecure_channel(gateway.address, interceptors=interceptors) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            first = await stub.Recommend(recommend("home", user="swap"), timeout=30)
            assert "embedded-v1" in first.model_version and not first.degraded
            publish_bundle(republish(rank_bundle, tmp_path / "staging-2", "embedded-v2"), root)
            answer = first
            for _ in range(600):  # a bound on the wait (~60 s), not a timing assertion
                answer = await stub.Recommend(recommend("home", user="swap"), timeout=30)
                assert not answer.degraded, answer.degraded_reasons
                if "embedded-v2" in answer.model_version:
                    break
                await asyncio.sleep(0.1)
            assert "embedded-v2" in answer.model_version
            assert [i.item_id for i in answer.items] == [i.item_id for i in first.items]  # same weights
    finally:
        await gateway.stop(0)
