"""Rendering the recsys Helm chart offline with the Helm SDK (helm-python-sdk) for the deploy tests."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_DIR = REPO_ROOT / "deploy"
CHART_DIR = DEPLOY_DIR / "helm" / "recsys"
RELEASE = "shop"
NAMESPACE = "recsys"
KUBE_VERSION = "1.30.0"
MONITORING_API = "monitoring.coreos.com/v1"
COMPONENTS = ("recall", "rank", "gateway")
GRPC_ROUTE_API = "gateway.networking.k8s.io/v1/GRPCRoute"
# What every install has to say: the store holding the bundles, and the version (and archive
# sha256) each model serves. The chart refuses to render a model without them.
BUNDLE_STORE = "s3://models.example/recsys"
BUNDLE_VALUES: dict[str, Any] = {
    "bundles": {"store": BUNDLE_STORE},
    "recall": {"bundle": {"version": "recall-20261201T060000", "sha256": "1" * 64}},
    "rank": {"bundle": {"version": "rank-20261201T060000", "sha256": "2" * 64}},
}


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in (nested dicts merged, anything else replaced)."""
    merged = json.loads(json.dumps(base))
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def with_bundles(values: dict[str, Any] | None = None) -> dict[str, Any]:
    """``values`` on top of the required bundle coordinates (BUNDLE_VALUES)."""
    return deep_merge(BUNDLE_VALUES, values or {})


def helm_sdk() -> Any:
    """The ``helm_python`` module, or a skip naming how to install it."""
    return pytest.importorskip(
        "helm_python", reason="helm-python-sdk is not installed (pip install -e '.[deploy]')"
    )


@dataclass(frozen=True)
class Manifest:
    """One rendered Kubernetes object and the template that produced it."""

    template: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.body["kind"]

    @property
    def name(self) -> str:
        return self.body["metadata"]["name"]


def render(
    values: dict[str, Any] | None = None,
    api_versions: tuple[str, ...] = (),
    kube_version: str = KUBE_VERSION,
    bundles: bool = True,
) -> dict[str, str]:
    """Render the chart as an install of release ``shop`` into namespace ``recsys``, with the
    required bundle coordinates (BUNDLE_VALUES) under ``values`` unless ``bundles`` is False.

    ``Chart.render`` has no way to announce the cluster's APIs, so this calls the SDK's native
    render with its ``api_versions``/``kube_version`` options (what ``helm template
    --api-versions --kube-version`` does); a test checks the option really reaches
    ``.Capabilities``.
    """
    helm = helm_sdk()
    options = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True, "kube_version": kube_version}
    if api_versions:
        options["api_versions"] = list(api_versions)
    with helm.Chart.load(CHART_DIR) as chart:
        rendered = helm._native.call_string(
            "helm_render",
            chart._raw(),
            json.dumps(with_bundles(values) if bundles else values or {}),
            json.dumps(options),
        )
    return json.loads(rendered)


def manifests(rendered: dict[str, str]) -> list[Manifest]:
    """Every Kubernetes object in a render (NOTES.txt and empty documents dropped)."""
    objects = []
    for template, text in sorted(rendered.items()):
        if not template.endswith((".yaml", ".yml")):
            continue
        objects.extend(Manifest(template, body) for body in yaml.safe_load_all(text) if body)
    return objects


def find(objects: list[Manifest], kind: str, name: str) -> dict[str, Any]:
    """The body of the one object of ``kind`` named ``name``."""
    matches = [m.body for m in objects if m.kind == kind and m.name == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def kinds(objects: list[Manifest]) -> set[str]:
    return {m.kind for m in objects}
