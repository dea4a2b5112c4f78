"""`python -m recsys.app.grpc_floor`: the CPU per call of an echo hop, from both processes."""

from __future__ import annotations

from recsys.app.grpc_floor import measure
from recsys.grpc_env import GRPC_EXPERIMENTS_VARIABLE, SERVING_GRPC_EXPERIMENTS


def test_an_echo_hop_reports_cpu_per_call_of_server_and_client():
    result = measure(rate=50.0, seconds=1.0, size=1000)
    assert result["calls"] == 50 and result["bytes"] == 1000
    assert result["server_cpu_ms_per_call"] > 0 and result["client_cpu_ms_per_call"] > 0
    assert result["grpc"] and result["event_loop"] in ("uvloop", "asyncio")


def test_the_echo_server_runs_with_the_services_grpc_settings_unless_the_environment_sets_them(
    monkeypatch,
):
    monkeypatch.delenv(GRPC_EXPERIMENTS_VARIABLE, raising=False)
    assert measure(rate=50.0, seconds=0.2, size=10)["grpc_experiments"] == SERVING_GRPC_EXPERIMENTS
    monkeypatch.setenv(GRPC_EXPERIMENTS_VARIABLE, "")
    assert measure(rate=50.0, seconds=0.2, size=10)["grpc_experiments"] == ""
