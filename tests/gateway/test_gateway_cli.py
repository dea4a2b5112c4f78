"""`recsys query`, `recsys query events` and the gateway bench against a gateway over fakes."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway import bench, query
from gateway.config import GatewayConfig
from gateway.server import batched
from recsys.serving.auth import TOKEN_ENV, write_tokens_file
from recsys.v1 import recall_pb2
from tests.gateway.conftest import TEST_TOKEN, FakeStack


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "dev-token"
    path.write_text(TEST_TOKEN + "\n")
    return path


async def run_query(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(query.main, argv, out)
    return code, out.getvalue()


async def test_query_prints_a_table_and_events_are_sent(fake_stack: FakeStack, token_file: Path):
    target = ["--gateway", fake_stack.gateway.address, "--token-file", str(token_file)]
    code, text = await run_query(
        ["events", *target, "--user", "u9", "--item", "i60", "--type", "add_to_cart", "--event-id", "ev-1"]
    )
    assert code == 0 and "event ev-1: accepted 1, duplicates 0" in text
    code, text = await run_query([*target, "--scenario", "cart", "--user", "u9", "-n", "3", "--debug"])
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["#", "item", "score", "source"] and "explanation" in lines[0]
    assert [line.split()[0] for line in lines[2:5]] == ["1", "2", "3"]
    assert "3 items  model rank=fake-rank-1,recall=fake-recall-1  ok" in text
    assert np.frombuffer(fake_stack.fake_recall.behaviour.requests[-1].seed_items, "<i4").tolist() == [60]


async def test_query_reports_a_bad_request_with_its_field(
    fake_stack: FakeStack, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(TOKEN_ENV, TEST_TOKEN)  # the token from the environment
    code, _ = await run_query(
        ["--gateway", fake_stack.gateway.address, "--scenario", "item_detail", "--user", "u"]
    )
    assert code == 1
    assert "INVALID_ARGUMENT: context.item_ids: required" in capsys.readouterr().err


async def test_query_without_a_token_is_unauthenticated_and_says_how_to_get_one(
    fake_stack: FakeStack,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # no artifacts/dev-token here
    code, _ = await run_query(["--gateway", fake_stack.gateway.address, "--user", "u"])
    err = capsys.readouterr().err
    assert code == 1
    assert "UNAUTHENTICATED: missing 'authorization: Bearer <token>' metadata" in err
    assert "--token-file" in err and TOKEN_ENV in err
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "artifacts" / "dev-token").write_text(TEST_TOKEN + "\n")  # what `make run` writes
    code, text = await run_query(["--gateway", fake_stack.gateway.address, "--user", "u", "-n", "2"])
    assert code == 0 and "2 items" in text
    code, _ = await run_query(["--token-file", str(tmp_path / "missing"), "--user", "u"])
    assert code == 2 and "--token-file: cannot read a token" in capsys.readouterr().err


def test_help_says_whether_the_token_is_set_never_its_value(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    secret = "s3cret-token-value"
    monkeypatch.setenv(TOKEN_ENV, secret)
    for main, argv in (
        [query.main, ["--help"]],
        [query.main, ["events", "--help"]],
        [bench.main, ["--help"]],
    ):
        with pytest.raises(SystemExit):
            main(argv)
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert f"env {TOKEN_ENV}, now set" in text and secret not in text
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(SystemExit):
        query.main(["--help"])
    assert f"env {TOKEN_ENV}, now unset" in " ".join(capsys.readouterr().out.split())


async def test_bench_reports_latency_percentiles(fake_stack: FakeStack, tmp_path: Path, token_file: Path):
    out = tmp_path / "bench.json"
    argv = [
        "--gateway",
        fake_stack.gateway.address,
        "--token-file",
        str(token_file),
        "--concurrency",
        "4",
        "--requests",
        "40",
        "--warmup",
        "4",
        "--category",
        "c1",
        "--out",
        str(out),
    ]
    assert await asyncio.to_thread(bench.main, argv) == 0
    result = json.loads(out.read_text())
    # every request counted; a host busy with other work may push a stage past its deadline (a
    # fallback, counted as degraded), never an error
    assert sum(result["outcomes"].values()) == 40 and set(result["outcomes"]) <= {"ok", "degraded"}
    assert result["outcomes"]["ok"] >= 36
    assert set(result["latency_by_scenario"]) == {"home", "item_detail", "cart", "category"}
    assert 0 < result["latency"]["p50_ms"] <= result["latency"]["p99_ms"]


def test_gateway_config_reads_env_and_flags_and_rejects_bad_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.setenv("RECSYS_MAX_IN_FLIGHT", "7")
    monkeypatch.setenv("RECSYS_HISTORY_BACKEND", "redis")
    monkeypatch.setenv("RECSYS_ALLOW_UNAUTHENTICATED", "1")
    config = GatewayConfig.from_args(["--rank-address", "rank:1"])
    assert (config.max_in_flight, config.history_backend, config.rank_address) == (7, "redis", "rank:1")
    assert (config.serving.port, config.serving.metrics_port) == (50050, 9090)
    assert config.recall_addresses == ()  # one recall service
    monkeypatch.setenv("RECSYS_RECALL_ADDRESSES", "recall-0.h:50051, recall-1.h:50051")
    assert GatewayConfig.from_args([]).recall_addresses == ("recall-0.h:50051", "recall-1.h:50051")
    with pytest.raises(SystemExit):
        GatewayConfig.from_args(["--recall-addresses", "no-port"])
    assert "recall_addresses: each must be HOST:PORT" in capsys.readouterr().err
    monkeypatch.delenv("RECSYS_RECALL_ADDRESSES")
    with pytest.raises(SystemExit):
        GatewayConfig.from_args(["--history-backend", "mongo"])
    assert "history_backend: must be sqlite or redis" in capsys.readouterr().err
    monkeypatch.setenv("RECSYS_MAX_IN_FLIGHT", "many")
    with pytest.raises(SystemExit):
        GatewayConfig.from_args([])
    assert "RECSYS_MAX_IN_FLIGHT: invalid value 'many'" in capsys.readouterr().err
    monkeypatch.delenv("RECSYS_MAX_IN_FLIGHT")
    assert GatewayConfig.from_args([]).downstream_max_hold_ms == 0.0  # no bound by default
    monkeypatch.setenv("RECSYS_DOWNSTREAM_MAX_HOLD_MS", "12.5")
    assert GatewayConfig.from_args([]).downstream_max_hold_ms == 12.5
    for bad in ("-1", "nan", "20000"):
        with pytest.raises(SystemExit):
            GatewayConfig.from_args(["--downstream-max-hold-ms", bad])
        assert "downstream_max_hold_ms: must be in 0..10000 ms" in capsys.readouterr().err


def test_the_max_hold_reaches_the_coalesced_calls_and_their_releases_are_counted(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("RECSYS_ALLOW_UNAUTHENTICATED", "1")
    stub = type("Stub", (), {"Recall": None, "RecallBatch": None})()
    registry = CollectorRegistry()
    config = GatewayConfig.from_args(["--downstream-max-hold-ms", "15"])
    coalescer = batched(stub, "Recall", recall_pb2.RecallBatchRequest, config, registry).Recall
    assert coalescer.max_hold_s == pytest.approx(0.015)
    coalescer._on_release()
    labels = {"service": "recall"}
    assert registry.get_sample_value("recsys_gateway_downstream_released_calls_total", labels) == 1.0
    unbounded = batched(stub, "Recall", recall_pb2.RecallBatchRequest, GatewayConfig.from_args([]), registry)
    assert unbounded.Recall.max_hold_s is None  # 0 ms: queued requests wait for a call to return


def test_gateway_needs_a_tokens_file_or_the_explicit_opt_out(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
):
    for name in ("RECSYS_AUTH_TOKENS_FILE", "RECSYS_ALLOW_UNAUTHENTICATED"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit):
        GatewayConfig.from_args([])
    assert "auth_tokens_file: required" in capsys.readouterr().err
    assert GatewayConfig.from_args(["--allow-unauthenticated"]).allow_unauthenticated
    monkeypatch.setenv("RECSYS_ALLOW_UNAUTHENTICATED", "yes")
    assert GatewayConfig.from_args([]).auth_tokens_file is None
    monkeypatch.setenv("RECSYS_ALLOW_UNAUTHENTICATED", "maybe")
    with pytest.raises(SystemExit):
        GatewayConfig.from_args([])
    assert "RECSYS_ALLOW_UNAUTHENTICATED: invalid value 'maybe'" in capsys.readouterr().err
    monkeypatch.delenv("RECSYS_ALLOW_UNAUTHENTICATED")
    tokens = tmp_path / "tokens.json"
    write_tokens_file(tokens, [("ops", "t", ["admin"])])
    monkeypatch.setenv("RECSYS_AUTH_TOKENS_FILE", str(tokens))
    assert GatewayConfig.from_args([]).auth_tokens_file == tokens


def test_gateway_help_never_shows_the_redis_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.setenv("RECSYS_REDIS_URL", "redis://:hunter2-secret@redis:6379/0")
    with pytest.raises(SystemExit):
        GatewayConfig.from_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "hunter2-secret" not in text and "redis://:***@redis:6379/0" in text
