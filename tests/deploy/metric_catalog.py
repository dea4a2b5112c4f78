"""The metric names the services export, and the metric references in PromQL queries.

The documented set comes from docs/CONVENTIONS.md (the contract every service follows); the live
test (test_prometheus_live.py) checks the same references against a real /metrics scrape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.deploy.chart import DEPLOY_DIR, REPO_ROOT

CONVENTIONS = REPO_ROOT / "docs" / "CONVENTIONS.md"
DASHBOARD = DEPLOY_DIR / "grafana" / "recsys-dashboard.json"
ALERTS = DEPLOY_DIR / "prometheus" / "alerts.yaml"
# Labels Prometheus adds to every scraped series (the Prometheus Operator's service discovery adds
# namespace and pod; a global or Thanos/Mimir setup adds cluster), and synthetic series it creates
# per target.
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "cluster"})
SYNTHETIC_METRICS = frozenset({"up"})
# Exported by prometheus_client's process collector in every service (not recsys's own contract).
PROCESS_METRICS: dict[str, frozenset[str]] = {
    name: frozenset()
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
    )
}
# Series of other exporters the dashboard reads where they run (NVIDIA's DCGM exporter on GPU
# nodes, which labels each GPU with the pod using it); never in a recsys scrape.
EXTERNAL_METRICS: dict[str, frozenset[str]] = {
    name: frozenset({"gpu", "UUID", "device", "modelName", "Hostname", "container"})
    for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED")
}
# The families whose label values CONVENTIONS.md lists (another family may use the same label name
# with other values, e.g. recsys_bundle_reload_total{outcome="refused"}).
LABEL_VALUE_FAMILIES = {
    "stage": ("recsys_stage_seconds", "recsys_candidates"),
    "outcome": ("recsys_requests_total",),
}
# Documented metrics with no series until their first event (a sampled ANN check, a click or a
# conversion attributed to an answer): the live scrape checks them only when they are present.
LAZY_METRICS = frozenset(
    {
        "recsys_recall_live_ann_recall",
        "recsys_clicks_total",
        "recsys_conversions_total",
        "recsys_recall_shard_failures_total",
    }
)
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan"})

_METRIC = re.compile(
    r"`([a-z_:][a-z0-9_:]*)(?:\{([a-z_,]*)\})?`(?:\s*(?:histogram|gauge|counter))?\s*(\{[a-z_,]+\})?"
)
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


@dataclass
class MetricCatalog:
    """Documented metric families: name -> label names, and label -> allowed values."""

    labels: dict[str, frozenset[str]]
    label_values: dict[str, frozenset[str]] = field(default_factory=dict)

    def family(self, series_name: str) -> str | None:
        """The documented family a series name belongs to (``x_bucket`` -> ``x``), else None."""
        if series_name in self.labels:
            return series_name
        for suffix in HISTOGRAM_SUFFIXES:
            base = series_name.removesuffix(suffix)
            if base != series_name and base in self.labels and not base.endswith("_total"):
                return base
        return None


def documented_catalog(text: str | None = None) -> MetricCatalog:
    """Parse the Metrics section of docs/CONVENTIONS.md."""
    text = CONVENTIONS.read_text() if text is None else text
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    labels: dict[str, frozenset[str]] = {}
    for name, inline, trailing in _METRIC.findall(section):
        names = inline or (trailing or "").strip("{}")
        # A name may appear twice (e.g. once with labels, once in prose): keep every label seen.
        labels[name] = labels.get(name, frozenset()) | {label for label in names.split(",") if label}
    values = {}
    for label, listed in (("stage", "stages"), ("outcome", "outcome")):
        found = re.search(rf"\({listed}: ([a-z_, ]+)\)", section)
        assert found, f"CONVENTIONS.md no longer lists the {label} values"
        values[label] = frozenset(value.strip() for value in found.group(1).split(","))
    labels.update(PROCESS_METRICS)
    labels.update(EXTERNAL_METRICS)
    labels.update(recorded_series())
    return MetricCatalog(labels, values)


def recorded_series(path: Path | None = None) -> dict[str, frozenset[str]]:
    """The recording rules of the alert file: name -> the labels its expression keeps (its
    ``by (...)`` grouping)."""
    rules = yaml.safe_load((path or ALERTS).read_text())
    return {
        rule["record"]: frozenset(grouping_labels(rule["expr"])) - {"le"}
        for group in rules["groups"]
        for rule in group["rules"]
        if "record" in rule
    }


@dataclass(frozen=True)
class Reference:
    """A metric used by a query, with the label matchers written on it."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...]


def references(expression: str) -> list[Reference]:
    """Every metric a PromQL expression selects, with its matchers (label, operator, value)."""
    found = [
        Reference(name, tuple(_MATCHER.findall(body)))
        for name, body in _SELECTOR.findall(expression)
        if name not in {"by", "without", "on", "ignoring"}
    ]
    bare = _SELECTOR.sub(" ", expression)
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', " ", bare)
    bare = re.sub(r"\[[^\]]*\]", " ", bare)
    bare = _GROUPING.sub(" ", bare)
    for match in _IDENTIFIER.finditer(bare):
        name = match.group(0)
        followed_by_call = bare[match.end() :].lstrip().startswith("(")
        if name.lower() in PROMQL_KEYWORDS or followed_by_call or name.startswith("$"):
            continue
        if bare[max(match.start() - 1, 0)] == "$":
            continue
        found.append(Reference(name, ()))
    return found


def grouping_labels(expression: str) -> set[str]:
    """Label names in ``by (...)`` / ``on (...)`` clauses."""
    labels: set[str] = set()
    for listed in _GROUPING.findall(expression):
        labels.update(label.strip() for label in listed.split(",") if label.strip())
    return labels


def problems(expression: str, catalog: MetricCatalog) -> list[str]:
    """What in ``expression`` the documented metrics do not support (empty: all good)."""
    found: list[str] = []
    refs = references(expression)
    if not refs:
        found.append(f"no metric referenced in {expression!r}")
    usable_labels = set(TARGET_LABELS)
    for ref in refs:
        family = ref.metric
        if ref.metric in SYNTHETIC_METRICS:
            known = set(TARGET_LABELS)
        else:
            family = catalog.family(ref.metric)
            if family is None:
                found.append(f"{ref.metric}: not a documented metric")
                continue
            known = set(catalog.labels[family]) | TARGET_LABELS
            if ref.metric.endswith("_bucket"):
                known.add("le")
        usable_labels |= known
        for label, operator, value in ref.matchers:
            if label not in known:
                found.append(f"{ref.metric}: no label {label!r}")
            elif (
                operator in {"=", "!="}
                and label in catalog.label_values
                and family in LABEL_VALUE_FAMILIES.get(label, ())
                and "$" not in value
                and value not in catalog.label_values[label]
            ):
                found.append(f"{ref.metric}: {label}={value!r} is not a documented value")
    for label in grouping_labels(expression) - usable_labels:
        found.append(f"groups by {label!r}, which none of its metrics has")
    return found


def dashboard_expressions(dashboard: dict | None = None) -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and templating queries."""
    dashboard = json.loads(DASHBOARD.read_text()) if dashboard is None else dashboard
    expressions = []

    def walk(panels: Iterable[dict]) -> None:
        for panel in panels:
            expressions.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*[a-z_]+\)", variable["definition"])
            assert inner, variable["definition"]
            expressions.append(inner.group(1))
    return expressions


def alert_expressions(path: Path = ALERTS) -> list[str]:
    """Every rule's expression: alerts and recording rules."""
    rules = yaml.safe_load(path.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def alert_rules(path: Path = ALERTS) -> list[dict]:
    """The alerting rules (recording rules left out)."""
    rules = yaml.safe_load(path.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"] if "alert" in rule]
