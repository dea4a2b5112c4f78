"""`recsys query`, `recsys query events` and the gateway bench against a gateway over fakes."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from gateway import bench, query
from gateway.config import GatewayConfig
from tests.gateway.conftest import FakeStack


async def run_query(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    code = await asyncio.to_thread(query.main, argv, out)
    return code, out.getvalue()


async def test_query_prints_a_table_and_events_are_sent(fake_stack: FakeStack):
    target = ["--gateway", fake_stack.gateway.address]
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
    assert list(fake_stack.fake_recall.behaviour.requests[-1].seed_item_ids) == ["i60"]


async def test_query_reports_a_bad_request_with_its_field(
    fake_stack: FakeStack, capsys: pytest.CaptureFixture
):
    code, _ = await run_query(
        ["--gateway", fake_stack.gateway.address, "--scenario", "item_detail", "--user", "u"]
    )
    assert code == 1
    assert "INVALID_ARGUMENT: context.item_ids: required" in capsys.readouterr().err


async def test_bench_reports_latency_percentiles(fake_stack: FakeStack, tmp_path: Path):
    out = tmp_path / "bench.json"
    argv = [
        "--gateway",
        fake_stack.gateway.address,
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
    assert result["outcomes"] == {"ok": 40}
    assert set(result["latency_by_scenario"]) == {"home", "item_detail", "cart", "category"}
    assert 0 < result["latency"]["p50_ms"] <= result["latency"]["p99_ms"]


def test_gateway_config_reads_env_and_flags_and_rejects_bad_values(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.setenv("RECSYS_MAX_IN_FLIGHT", "7")
    monkeypatch.setenv("RECSYS_HISTORY_BACKEND", "redis")
    config = GatewayConfig.from_args(["--rank-address", "rank:1"])
    assert (config.max_in_flight, config.history_backend, config.rank_address) == (7, "redis", "rank:1")
    assert (config.serving.port, config.serving.metrics_port) == (50050, 9090)
    with pytest.raises(SystemExit):
        GatewayConfig.from_args(["--history-backend", "mongo"])
    assert "history_backend: must be sqlite or redis" in capsys.readouterr().err
    monkeypatch.setenv("RECSYS_MAX_IN_FLIGHT", "many")
    with pytest.raises(SystemExit):
        GatewayConfig.from_args([])
    assert "RECSYS_MAX_IN_FLIGHT: invalid value 'many'" in capsys.readouterr().err
