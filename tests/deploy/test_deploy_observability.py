"""Alert rules (promtool check + promtool unit tests) and the Grafana dashboard (structure, and
every query against the metrics the services document)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.chart import CHART_DIR, DEPLOY_DIR, REPO_ROOT
from tests.deploy.metric_catalog import (
    _SELECTOR,
    ALERTS,
    DASHBOARD,
    alert_expressions,
    alert_rules,
    dashboard_expressions,
    documented_catalog,
    grouping_labels,
    problems,
    references,
)

ALERT_TESTS = Path(__file__).with_name("alerts_test.yaml")
RUNBOOK = REPO_ROOT / "docs" / "RUNBOOK.md"
RUNBOOK_URL = "https://github.com/example/recsys/blob/main/docs/RUNBOOK.md"
# Labels every aggregation keeps, so two releases (or clusters) in one Prometheus never merge.
RELEASE_LABELS = {"cluster", "namespace"}


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
    """Each alert is tested firing (exp_alerts) and not firing (an empty exp_alerts case)."""
    alerts = {rule["alert"] for rule in alert_rules()}
    cases = [
        case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts == fired, "every alert needs a promtool case where it fires"
    assert alerts == silent, "every alert needs a promtool case where it stays silent"
    assert {
        "RecsysHighP99Latency",
        "RecsysHighErrorRatio",
        "RecsysHighFallbackRatio",
        "RecsysTargetDown",
        "RecsysLiveAnnRecallLow",
        "RecsysBundleReloadRefused",
        "RecsysBatchQueueWaitHigh",
    } <= alerts
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])


def test_every_alert_links_its_runbook_section() -> None:
    text = RUNBOOK.read_text()
    # GitHub's anchors: the heading lowercased, punctuation dropped, spaces as dashes.
    anchors = {
        re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")
        for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    }
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == RUNBOOK_URL, rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors, f"{rule['alert']}: no section #{anchor}"


def test_every_rule_keeps_cluster_and_namespace() -> None:
    """Every aggregation in a rule groups by cluster and namespace (or works per series, which
    carries them), so two releases in one Prometheus are judged apart."""
    for expression in alert_expressions():
        for grouping in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expression):
            labels = {label.strip() for label in grouping.split(",")}
            assert labels >= RELEASE_LABELS, f"by/on ({grouping}) drops the release in {expression!r}"
        assert not re.search(r"\b(?:sum|avg|max|min|count)\s*\(", expression), (
            f"aggregation without by: {expression!r}"
        )
        assert "without" not in expression and "absent(" not in expression, expression


def test_ratio_alerts_have_a_traffic_guard() -> None:
    """A ratio of a few requests is noise: every alert dividing rates also requires traffic."""
    for rule in alert_rules():
        expression = rule["expr"]
        if "/" in expression or rule["alert"].endswith(("BudgetBurnFast", "BudgetBurnSlow")):
            assert re.search(r"and on \([^)]*\)\s*sum by \([^)]*\) \((rate|increase)\(", expression), rule[
                "alert"
            ]


def test_deadline_exceeded_is_not_a_server_fault() -> None:
    """The gateway degrades on a slow rank: DEADLINE_EXCEEDED is a warning, never a page."""
    for rule in alert_rules():
        if "DEADLINE_EXCEEDED" in rule["expr"]:
            assert rule["labels"]["severity"] == "warning", rule["alert"]
    (server_errors,) = [rule for rule in alert_rules() if rule["alert"] == "RecsysGrpcServerErrors"]
    assert "DEADLINE_EXCEEDED" not in server_errors["expr"]


def test_slo_burn_rate_alerts_cover_availability_and_latency_per_scenario() -> None:
    burns = {rule["alert"]: rule for rule in alert_rules() if "BudgetBurn" in rule["alert"]}
    assert {(rule["labels"]["slo"], rule["labels"]["severity"]) for rule in burns.values()} == {
        ("availability", "critical"),
        ("availability", "warning"),
        ("latency", "critical"),
        ("latency", "warning"),
    }
    for rule in burns.values():
        assert "scenario" in grouping_labels(rule["expr"])


def test_latency_buckets_surround_the_budgets_the_alerts_read() -> None:
    from recsys.serving.metrics import LATENCY_BUCKETS

    budgets = {0.12, 0.15, 0.3}  # stage timeouts (recall, rank) and the scenario total
    assert budgets <= set(LATENCY_BUCKETS)
    between = [b for b in LATENCY_BUCKETS if 0.1 <= b <= 0.3]
    assert len(between) >= 6 and max(b - a for a, b in itertools.pairwise(between)) <= 0.05 + 1e-9
    thresholds = {float(v) for v in re.findall(r'le="([0-9.]+)"', " ".join(alert_expressions()))}
    assert thresholds and thresholds <= set(LATENCY_BUCKETS), "an SLO ratio must read a real bucket"


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
    assert {"cluster", "namespace", "scenario", "service"} <= set(variables)
    for name in ("cluster", "namespace"):
        # "All" must also match series without the label (a Prometheus without `cluster`).
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    repeated = [panel for panel in all_panels if panel["type"] == "row" and panel.get("repeat")]
    assert [row["repeat"] for row in repeated] == ["scenario"], "one row per scenario"

    expressions = " ".join(dashboard_expressions(dashboard))
    required = {
        "request rate by scenario": r"sum by \(namespace, scenario, outcome\) \(rate\(recsys_requests_total",
        "error ratio": r'recsys_requests_total\{[^}]*outcome="error"',
        "fallbacks": r"rate\(recsys_fallbacks_total",
        "shed requests": r'recsys_requests_total\{[^}]*outcome="shed"',
        "candidates per stage": r"recsys_candidates_bucket",
        "bundle version": r"max by \(namespace, service, kind, version\) \(recsys_bundle_info",
        "gRPC rate per service": r"rate\(grpc_server_handled_total",
        "gRPC latency per service": r"grpc_server_handling_seconds_bucket",
        "per-stage latency": r"sum by \(stage, le\) \(rate\(recsys_stage_seconds_bucket",
        "SLO burn rates": r"recsys:availability_errors:ratio_rate1h.*recsys:latency_slow:ratio_rate1h",
        "queue wait": r"recsys_batch_queue_seconds_bucket",
        "reload outcomes": r"recsys_bundle_reload_total",
        "live ANN recall": r"recsys_recall_live_ann_recall",
        "CTR per arm": r"sum by \(scenario, experiment, arm\) \(rate\(recsys_clicks_total[^/]*/ "
        r"sum by \(scenario, experiment, arm\) \(rate\(recsys_impressions_total",
        "process CPU and memory": r"process_cpu_seconds_total.*process_resident_memory_bytes",
        "CPU per Recommend": r"1000 \* sum by \(namespace\) \(rate\(process_cpu_seconds_total[^/]*/ "
        r"sum by \(namespace\) \(rate\(recsys_requests_total",
        "restarts": r"changes\(process_start_time_seconds",
        "GPU utilisation and memory": r"DCGM_FI_DEV_GPU_UTIL.*DCGM_FI_DEV_FB_USED",
    }
    for what, pattern in required.items():
        assert re.search(pattern, expressions), f"dashboard lacks {what}"
    for quantile in ("0.5", "0.95", "0.99"):
        pattern = (
            rf"histogram_quantile\({quantile}, sum by \(namespace, scenario, le\) "
            r'\(rate\(recsys_stage_seconds_bucket\{[^}]*stage="total"'
        )
        assert re.search(pattern, expressions), f"dashboard lacks p{quantile} per scenario"


def test_every_dashboard_query_is_filtered_by_cluster_and_namespace() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            for name, body in _SELECTOR.findall(target["expr"]):
                if name in {"by", "without", "on", "ignoring"}:
                    continue
                assert 'cluster=~"$cluster"' in body and 'namespace=~"$namespace"' in body, (
                    f"{panel['title']}: {name}{{{body}}}"
                )


def test_the_deploy_readme_names_only_variables_the_dashboard_has() -> None:
    readme = (DEPLOY_DIR / "README.md").read_text()
    (sentence,) = re.findall(
        r"The (`[a-z]+`(?:,\s+`[a-z]+`)*,?\s+and\s+`[a-z]+`)\s+variables filter it", readme
    )
    named = set(re.findall(r"`([a-z]+)`", sentence))
    variables = {variable["name"] for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert named and named <= variables and {"cluster", "namespace"} <= named


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
