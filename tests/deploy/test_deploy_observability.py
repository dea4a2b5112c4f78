"""Alert rules (promtool check + promtool unit tests) and the Grafana dashboard (structure, and
every query against the metrics the services document)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import CHART_DIR, DEPLOY_DIR
from tests.deploy.metric_catalog import (
    ALERTS,
    DASHBOARD,
    alert_expressions,
    dashboard_expressions,
    documented_catalog,
    problems,
    references,
)

ALERT_TESTS = Path(__file__).with_name("alerts_test.yaml")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found (Debian package prometheus; `make system-deps` installs it)")
    return path


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows flattened."""
    flat = []
    for panel in dashboard["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return flat


def test_alert_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout + result.stderr)


def test_alert_rules_fire_as_specified_by_promtool_unit_tests() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_and_the_required_alerts_exist() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tested = {
        case["alertname"]
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert alerts == tested
    assert {
        "RecsysHighP99Latency",
        "RecsysHighErrorRatio",
        "RecsysHighFallbackRatio",
        "RecsysTargetDown",
    } <= alerts
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert {"summary", "description"} <= set(rule["annotations"])


def test_deploy_files_and_chart_files_are_one_source() -> None:
    for outside, inside in (
        (DEPLOY_DIR / "grafana" / "recsys-dashboard.json", CHART_DIR / "files" / "recsys-dashboard.json"),
        (DEPLOY_DIR / "prometheus" / "alerts.yaml", CHART_DIR / "files" / "alerts.yaml"),
    ):
        assert outside.read_bytes() == inside.read_bytes(), f"{outside} differs from the chart's {inside}"


def test_dashboard_has_the_panels_an_sre_expects() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    all_panels = panels(dashboard)
    ids = [panel["id"] for panel in all_panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries = [panel for panel in all_panels if panel["type"] != "row"]
    for panel in queries:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(target["datasource"]["uid"] == "${datasource}" for target in panel["targets"])
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )

    expressions = " ".join(dashboard_expressions(dashboard))
    required = {
        "request rate by scenario": r"sum by \(scenario, outcome\) \(rate\(recsys_requests_total",
        "error ratio": r'recsys_requests_total\{[^}]*outcome="error"',
        "fallbacks": r"rate\(recsys_fallbacks_total",
        "shed requests": r'recsys_requests_total\{[^}]*outcome="shed"',
        "candidates per stage": r"recsys_candidates_bucket",
        "bundle version": r"max by \(service, kind, version\) \(recsys_bundle_info\)",
        "gRPC rate per service": r"rate\(grpc_server_handled_total",
        "gRPC latency per service": r"grpc_server_handling_seconds_bucket",
        "per-stage latency": r"sum by \(stage, le\) \(rate\(recsys_stage_seconds_bucket",
    }
    for what, pattern in required.items():
        assert re.search(pattern, expressions), f"dashboard lacks {what}"
    for quantile in ("0.5", "0.95", "0.99"):
        pattern = (
            rf"histogram_quantile\({quantile}, sum by \(scenario, le\) "
            r'\(rate\(recsys_stage_seconds_bucket\{[^}]*stage="total"'
        )
        assert re.search(pattern, expressions), f"dashboard lacks p{quantile} per scenario"


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_documented_metrics_labels_and_values(source: str) -> None:
    catalog = documented_catalog()
    expressions = dashboard_expressions() if source == "dashboard" else alert_expressions()
    assert expressions
    found = {expression: problems(expression, catalog) for expression in expressions}
    assert not {expression: issues for expression, issues in found.items() if issues}


def test_the_reference_check_catches_mistakes() -> None:
    """The check above would pass vacuously if the parser saw nothing; show that it sees typos."""
    catalog = documented_catalog()
    assert [ref.metric for ref in references("sum(rate(recsys_requests_total[5m])) / sum(up)")] == [
        "recsys_requests_total",
        "up",
    ]
    assert problems("rate(recsys_stage_secnds_bucket[5m])", catalog)
    assert problems('rate(recsys_stage_seconds_bucket{stage="totl"}[5m])', catalog)
    assert problems('rate(recsys_requests_total{senario="home"}[5m])', catalog)
    assert problems("sum by (scenario) (rate(grpc_server_handled_total[5m]))", catalog)
    assert problems("rate(recsys_requests_total_bucket[5m])", catalog)
    assert not problems(
        'sum by (scenario, le) (rate(recsys_stage_seconds_bucket{stage="total"}[5m]))', catalog
    )
