"""The open-loop load generator against a real gateway (fake downstreams): it keeps its schedule,
counts every outcome and measures from the scheduled send; against several gateway replicas (one
history file) it spreads the calls round-robin, and each replica sees what another stored."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.server import serve
from recsys.app import loadgen
from recsys.serving.metrics import new_registry
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.conftest import TEST_TOKEN, FakeStack, gateway_channel, gateway_config
from tests.gateway.fakes import ITEM_IDS, history_of


@pytest.fixture
def id_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    users = tmp_path / "users.txt"
    users.write_text("".join(f"u{i}\n" for i in range(20)))
    items = tmp_path / "items.txt"
    items.write_text("\n".join(ITEM_IDS) + "\n")
    token = tmp_path / "token"
    token.write_text(TEST_TOKEN + "\n")
    return users, items, token


async def test_open_loop_run_counts_every_request_and_its_outcome(fake_stack: FakeStack, id_files):
    users, items, token = id_files
    args = loadgen.build_parser().parse_args(
        [
            "--gateway", fake_stack.gateway.address, "--token-file", str(token), "--rate", "80",
            "--duration", "1.5", "--warmup", "0.3", "--scenario", "item_detail",
            "--users", str(users), "--items", str(items),
        ]
    )  # fmt: skip
    result = await loadgen.run(args)
    assert result["errors"] == 0 and sum(result["outcomes"].values()) == result["requests"]
    # a host busy with other work may push a stage past its deadline: a fallback, counted as such
    assert (
        set(result["outcomes"]) <= {"ok", "degraded"} and result["outcomes"]["ok"] >= 0.9 * result["requests"]
    )
    assert 60 <= result["requests"] <= 200  # Poisson around 80/s x 1.5 s
    assert result["sent"] > result["requests"]  # the warm-up requests are sent, not measured
    latency = result["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    calls = fake_stack.fake_recall.behaviour.requests
    assert all(len(call.seed_items) == 4 for call in calls[-result["requests"] :])  # a context item each


async def test_failures_are_counted_by_status_not_hidden(fake_stack: FakeStack, id_files):
    users, items, token = id_files
    token.write_text("not-a-valid-token\n")
    args = loadgen.build_parser().parse_args(
        [
            "--gateway", fake_stack.gateway.address, "--token-file", str(token), "--rate", "50",
            "--duration", "0.5", "--warmup", "0", "--users", str(users), "--items", str(items),
        ]
    )  # fmt: skip
    with pytest.raises(Exception, match="UNAUTHENTICATED"):
        await loadgen.run(args)  # the connection check refuses to measure a run that cannot succeed


def recommend_count(registry) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "recsys_requests"
        for sample in metric.samples
        if sample.name == "recsys_requests_total"
    )


async def test_replicas_share_the_load_and_one_history(fake_stack: FakeStack, id_files, tmp_path: Path):
    users, items, token = id_files
    # a second replica: its own process state, the same downstreams and the same SQLite file
    config = gateway_config(tmp_path, fake_stack.recall.address, fake_stack.rank.address)
    assert str(config.sqlite_path) == fake_stack.gateway.servicer.history_store.path
    replica = await serve(config, new_registry(False))
    try:
        target = loadgen.gateway_target([fake_stack.gateway.address, replica.address])
        assert target == f"ipv4:{fake_stack.gateway.address},{replica.address}"
        args = loadgen.build_parser().parse_args(
            [
                "--gateway", target, "--token-file", str(token), "--rate", "60", "--duration", "1",
                "--warmup", "0.2", "--users", str(users), "--items", str(items),
            ]
        )  # fmt: skip
        result = await loadgen.run(args)
        assert result["errors"] == 0
        served = [recommend_count(fake_stack.gateway.registry), recommend_count(replica.registry)]
        assert sum(served) == result["sent"] + 1  # + the connection check
        assert min(served) >= 0.3 * sum(served)  # round-robin, not all on one replica

        # an event acknowledged by one replica is in the history the other one sends to recall
        event = gateway_pb2.Event(event_id="shared-1", user_id="u-shared", item_id=ITEM_IDS[5], type=1)
        await fake_stack.stub.LogEvents(gateway_pb2.LogEventsRequest(events=[event]), timeout=5)
        async with gateway_channel(replica.address) as channel:
            request = gateway_pb2.RecommendRequest(user_id="u-shared", scenario="home", num_items=5)
            await gateway_pb2_grpc.GatewayStub(channel).Recommend(request, timeout=5)
        assert history_of(fake_stack.fake_recall.behaviour.requests[-1]) == [5]
    finally:
        await replica.stop(0)
