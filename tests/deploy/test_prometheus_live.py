"""A real Prometheus server scraping the real services: every scenario shows up in
``recsys_stage_seconds``, the alert rules load, every dashboard query runs, and every metric the
dashboard and the alerts reference is in a live /metrics scrape."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.metric_catalog import (
    ALERTS,
    EXTERNAL_METRICS,
    LAZY_METRICS,
    SYNTHETIC_METRICS,
    TARGET_LABELS,
    alert_expressions,
    dashboard_expressions,
    recorded_series,
    references,
)

pytestmark = pytest.mark.integration

SCRAPE_INTERVAL_S = 1
READY_TIMEOUT_S = 30.0
SERIES_TIMEOUT_S = 30.0
REQUESTS_PER_SCENARIO = 3
# Dashboard variables as Grafana substitutes them when "All" is selected.
DASHBOARD_VARIABLES = {
    "$scenario": ".*",
    "$service": "recsys-.*",
    "$cluster": ".*",
    "$namespace": ".*",
    "$__rate_interval": "1m",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def exported_series(metrics_text: str) -> tuple[set[str], dict[str, set[str]], set[str]]:
    """(series names a scrape can contain, label names seen per series name, grpc_code values)."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    codes: set[str] = set()
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    for family in text_string_to_metric_families(metrics_text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
            if "grpc_code" in sample.labels:
                codes.add(sample.labels["grpc_code"])
    return names, labels, codes


class PrometheusServer:
    """The Debian prometheus binary on loopback with a temporary config and storage."""

    def __init__(self, binary: str, workdir: Path, targets: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
            },
            "rule_files": [str(ALERTS.resolve())],
            "scrape_configs": [
                {
                    "job_name": f"recsys-{service}",
                    "metrics_path": urllib.parse.urlsplit(url).path,
                    "static_configs": [{"targets": [urllib.parse.urlsplit(url).netloc]}],
                }
                for service, url in sorted(targets.items())
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.command = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1h",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    async def wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT_S
        while loop.time() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log_tail()
            try:
                await asyncio.to_thread(http_get, f"{self.url}/-/ready", 1.0)
                return
            except OSError:
                await asyncio.sleep(0.2)
        pytest.fail(f"Prometheus not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}")

    async def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        body = json.loads(await asyncio.to_thread(http_get, f"{self.url}/api/v1/{path}{query}"))
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        return (await self.api("query", query=promql))["result"]

    async def wait_for_labels(self, promql: str, label: str, expected: set[str]) -> set[str]:
        """Poll ``promql`` until its series carry every ``expected`` value of ``label``; returns
        the values seen last."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SERIES_TIMEOUT_S
        seen: set[str] = set()
        while loop.time() < deadline:
            seen = {series["metric"][label] for series in await self.query(promql)}
            if seen >= expected:
                break
            await asyncio.sleep(SCRAPE_INTERVAL_S / 2)
        return seen

    async def targets(self) -> list[tuple[str, str, str]]:
        """(job, health, last error) of every active target: the message when a scrape fails."""
        active = (await self.api("targets"))["activeTargets"]
        return [(t["labels"]["job"], t["health"], t["lastError"]) for t in active]


def scenario_requests(dataset: Any, scenario_names: list[str]) -> list[Any]:
    """Recommend requests for every scenario, with the context each kind of page sends."""
    from recsys.v1 import gateway_pb2

    catalog = dataset.catalog
    viewed = dataset.items.external(int(dataset.sequences[0][-1]))
    category = catalog.category_names[int(catalog.category[dataset.items.dense(viewed)])]
    requests = []
    for scenario in scenario_names:
        context = gateway_pb2.RecommendContext()
        if scenario in {"item_detail", "cart"}:
            context.item_ids.append(viewed)
        if scenario == "category":
            context.category = category
        for attempt in range(REQUESTS_PER_SCENARIO):
            requests.append(
                gateway_pb2.RecommendRequest(
                    request_id=f"prometheus-{scenario}-{attempt}",
                    user_id=f"prometheus-user-{attempt}",
                    scenario=scenario,
                    num_items=10,
                    context=context,
                )
            )
    return requests


def dashboard_query(expression: str) -> str:
    for variable, value in DASHBOARD_VARIABLES.items():
        expression = expression.replace(variable, value)
    return expression


async def test_prometheus_scrapes_every_scenario_and_the_dashboard_queries_run(
    recall_bundle: Path, rank_bundle: Path, synthetic_dataset: Any, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not found (Debian package prometheus; `make system-deps` installs it)")
    from gateway.config import DEFAULT_SCENARIOS
    from recsys.v1 import gateway_pb2_grpc
    from tests.stack import running_stack

    scenario_names = sorted(yaml.safe_load(DEFAULT_SCENARIOS.read_text())["scenarios"])
    async with running_stack(recall_bundle, rank_bundle, tmp_path) as stack:
        prometheus = PrometheusServer(binary, tmp_path, stack.metrics_urls)
        prometheus.start()
        try:
            await prometheus.wait_ready()
            async with stack.gateway_channel() as channel:
                gateway = gateway_pb2_grpc.GatewayStub(channel)
                for request in scenario_requests(synthetic_dataset, scenario_names):
                    response = await gateway.Recommend(request, timeout=10)
                    assert response.items, request.scenario

            # The live cross-check: every referenced metric is in a real scrape.
            # Recorded series come from the rules, DCGM's from another exporter; metrics that appear
            # with their first event are checked when present.
            exported: set[str] = set(SYNTHETIC_METRICS) | set(recorded_series()) | set(EXTERNAL_METRICS)
            live_labels: dict[str, set[str]] = {}
            grpc_codes: set[str] = set()
            for url in stack.metrics_urls.values():
                names, labels, codes = exported_series(await asyncio.to_thread(http_get, url))
                exported |= names
                for name, seen in labels.items():
                    live_labels.setdefault(name, set()).update(seen)
                grpc_codes |= codes
            pending = set(LAZY_METRICS) - exported
            for expression in dashboard_expressions() + alert_expressions():
                for ref in references(expression):
                    if ref.metric in pending:
                        continue
                    assert ref.metric in exported, f"{ref.metric} (in {expression!r}) is not exported"
                    if ref.metric in live_labels:
                        unknown = (
                            {label for label, _, _ in ref.matchers} - live_labels[ref.metric] - TARGET_LABELS
                        )
                        assert not unknown, f"{ref.metric} has no label {unknown} in a live scrape"
            # The alert rules match status codes by grpc.StatusCode name.
            assert "OK" in grpc_codes and all(code.isupper() for code in grpc_codes), grpc_codes

            # Prometheus scrapes all three targets and sees every scenario in recsys_stage_seconds.
            jobs = {f"recsys-{service}" for service in stack.metrics_urls}
            scenarios_seen = await prometheus.wait_for_labels(
                'count by (scenario) (recsys_stage_seconds_count{stage="total"})',
                "scenario",
                set(scenario_names),
            )
            assert scenarios_seen >= set(scenario_names), (scenarios_seen, await prometheus.targets())
            jobs_up = await prometheus.wait_for_labels('up{job=~"recsys-.*"} == 1', "job", jobs)
            assert jobs_up == jobs, await prometheus.targets()
            bundles = await prometheus.query("recsys_bundle_info")
            assert {b["metric"]["kind"] for b in bundles} >= {"recall", "rank"}

            # The shipped alert rules load into a real server.
            groups = (await prometheus.api("rules"))["groups"]
            loaded = {rule["name"] for group in groups for rule in group["rules"]}
            expected = {
                rule.get("alert") or rule["record"]
                for group in yaml.safe_load(ALERTS.read_text())["groups"]
                for rule in group["rules"]
            }
            assert loaded == expected
            assert all(rule["health"] != "err" for group in groups for rule in group["rules"])

            # Every dashboard query is valid PromQL for the real server; the request rate has data.
            for expression in dashboard_expressions():
                await prometheus.query(dashboard_query(expression))
            served = await prometheus.query('sum by (scenario) (recsys_requests_total{outcome="ok"})')
            counts = {series["metric"]["scenario"]: float(series["value"][1]) for series in served}
            assert all(counts.get(name, 0) >= REQUESTS_PER_SCENARIO for name in scenario_names), counts
        finally:
            prometheus.stop()
    assert prometheus.process is not None and prometheus.process.poll() is not None
