"""The Helm chart: strict lint, a real Helm render for each switch combination, strict Kubernetes
schema validation of every rendered object, and the properties an SRE relies on."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import pytest
import yaml

from tests.deploy.chart import (
    BUNDLE_STORE,
    BUNDLE_VALUES,
    CHART_DIR,
    COMPONENTS,
    DEPLOY_DIR,
    GRPC_ROUTE_API,
    KUBE_VERSION,
    MONITORING_API,
    NAMESPACE,
    RELEASE,
    REPO_ROOT,
    Manifest,
    deep_merge,
    find,
    helm_sdk,
    kinds,
    manifests,
    render,
    with_bundles,
)

FULLNAME = f"{RELEASE}-recsys"
SHA256 = "0" * 64
GPU_ON = {"recall": {"gpu": {"enabled": True}}, "rank": {"gpu": {"enabled": True}}}
MONITORING_ON = {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
# The one way the chart runs the gateway on SQLite: one replica, no autoscaler, a claim for /data.
SQLITE_SINGLE_NODE = {
    "redis": {"enabled": False},
    "gateway": {"replicas": 1, "autoscaling": {"enabled": False}, "history": {"existingClaim": "history"}},
}
# Peers outside the release must be allowed explicitly once the gateway's egress is restricted.
MANAGED_REDIS_EGRESS = [
    {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}], "ports": [{"port": 6379, "protocol": "TCP"}]}
]
EXTERNAL_MODELS_EGRESS = [
    {
        "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ml"}}}],
        "ports": [{"port": 50051, "protocol": "TCP"}, {"port": 50052, "protocol": "TCP"}],
    }
]
INTERNAL_TLS = {"internalTLS": {"enabled": True, "rank": {"secretName": "rank-cert"}}}
# One extra rule per hook, told apart by its port.
EXTRA_INGRESS = {
    component: [{"from": [{"podSelector": {"matchLabels": {"app": "debug"}}}], "ports": [{"port": port}]}]
    for component, port in (("recall", 7001), ("rank", 7002), ("gateway", 7003), ("redis", 7004))
}
EXTRA_EGRESS = [{"to": [{"ipBlock": {"cidr": "10.99.0.0/16"}}], "ports": [{"port": 4317, "protocol": "TCP"}]}]
NETWORK_POLICY_HOOKS = {"networkPolicy": {"extraIngress": EXTRA_INGRESS, "extraEgress": EXTRA_EGRESS}}
# Clients of the gateway restricted to one namespace (gRPC and HTTP alike).
GATEWAY_CLIENTS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "shop-backend"}}}]
# Recall split into three index shards (a StatefulSet, one pod per shard), and the variables of
# that contract with the recall service and the gateway.
SHARDED = {"recall": {"shards": 3}}
# Every extension point, on each component: priority, hard anti-affinity, an extra spread rule,
# env from a Secret and the downward API, a Secret volume.
EXTRA_SPREAD = {
    "maxSkew": 2,
    "topologyKey": "topology.kubernetes.io/region",
    "whenUnsatisfiable": "DoNotSchedule",
    "labelSelector": {"matchLabels": {"app.kubernetes.io/part-of": "recsys"}},
}
EXTRA_ENV = [
    {"name": "PARTNER_API_KEY", "valueFrom": {"secretKeyRef": {"name": "partner", "key": "api-key"}}},
    {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
]
EXTRA_VOLUME = {"name": "partner-tls", "secret": {"secretName": "partner-tls", "defaultMode": 0o440}}
EXTRA_MOUNT = {"name": "partner-tls", "mountPath": "/etc/partner-tls", "readOnly": True}
EXTENSION = {
    "priorityClassName": "recsys-critical",
    "podAntiAffinity": "hard",
    "topologySpreadConstraints": [EXTRA_SPREAD],
    "extraEnv": EXTRA_ENV,
    "extraVolumes": [EXTRA_VOLUME],
    "extraVolumeMounts": [EXTRA_MOUNT],
}
EXTENSION_POINTS = {component: EXTENSION for component in COMPONENTS}
# Credentials of the fetch init container from a Secret (no workload identity), and an S3-compatible
# endpoint.
FETCH_ENV = [
    {"name": "AWS_ENDPOINT_URL", "value": "https://minio.storage.svc:9000"},
    {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "store", "key": "id"}}},
]
INGRESS_HTTP = {
    "gateway": {
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "tls": [{"secretName": "recsys-tls", "hosts": ["recsys.example.com"]}],
        }
    }
}
INGRESS_GRPC_AND_ROUTE = {
    "gateway": {
        "ingress": {
            "enabled": True,
            "backend": "grpc",
            "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"},
        },
        "grpcRoute": {
            "enabled": True,
            "parentRefs": [{"name": "shared", "namespace": "gateway-system"}],
            "hostnames": ["grpc.recsys.example.com"],
        },
    }
}

# The ranker inside the gateway's pods, the gateway sized for both.
RANK_IN_GATEWAY = {
    "rank": {"inGateway": True, "config": {"maxBatch": 32}},
    "gateway": {"resources": {"requests": {"cpu": "1500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}},
}

# The whole cascade (recall and rank) inside the gateway's pods.
CASCADE_IN_GATEWAY = deep_merge(
    RANK_IN_GATEWAY,
    {
        "recall": {"inGateway": True, "config": {"maxBatch": 16}},
        "gateway": {"resources": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}},
    },
)

# name -> (values, API versions the "cluster" announces)
OTLP_ENDPOINT = "http://otel-collector.observability:4317"
COMBINATIONS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "default": ({}, ()),
    "gpu": (GPU_ON, ()),
    "monitoring-with-api": (MONITORING_ON, (MONITORING_API,)),
    "monitoring-without-api": (MONITORING_ON, ()),
    "redis": ({"redis": {"enabled": True}}, ()),
    "redis-external-secret": (
        {
            "redis": {"enabled": False, "existingSecret": {"name": "history-redis", "key": "url"}},
            "networkPolicy": {"extraEgress": MANAGED_REDIS_EGRESS},
        },
        (),
    ),
    "redis-external-url-no-egress-policy": (
        {
            "redis": {"enabled": False, "externalUrl": "redis://r.example:6379/0"},
            "networkPolicy": {"egress": {"enabled": False}},
        },
        (),
    ),
    "redis-own-password-everysec": (
        {"redis": {"auth": {"existingSecret": "my-redis"}, "appendfsync": "everysec"}},
        (),
    ),
    "sqlite-single-node": (SQLITE_SINGLE_NODE, ()),
    "bundle-url": (
        {
            "recall": {"bundle": {"url": "https://models.example/recall.tgz", "sha256": SHA256}},
            "rank": {
                "bundle": {"url": "gs://models-example/rank/rank-20261201T060000.tar", "sha256": SHA256}
            },
        },
        (),
    ),
    "bundle-claim": (
        {
            "bundles": {"store": ""},
            "recall": {"bundle": {"existingClaim": "recsys-bundles"}},
            "rank": {"bundle": {"existingClaim": "recsys-bundles", "subPath": "models/rank"}},
        },
        (),
    ),
    "recall-sharded": (SHARDED, ()),
    "extension-points": (EXTENSION_POINTS, ()),
    "ingress-http": (INGRESS_HTTP, ()),
    "ingress-grpc-and-grpc-route": (INGRESS_GRPC_AND_ROUTE, (GRPC_ROUTE_API,)),
    "grpc-route-without-api": (INGRESS_GRPC_AND_ROUTE, ()),
    "gateway-only": (
        {
            "recall": {"enabled": False},
            "rank": {"enabled": False},
            "gateway": {"recallAddress": "recall.ml:50051", "rankAddress": "rank.ml:50052"},
            "networkPolicy": {"extraEgress": EXTERNAL_MODELS_EGRESS},
        },
        (),
    ),
    "rank-in-gateway": (RANK_IN_GATEWAY, ()),
    "rank-in-gateway-claim": (
        deep_merge(RANK_IN_GATEWAY, {"rank": {"bundle": {"existingClaim": "recsys-bundles"}}}),
        (),
    ),
    "cascade-in-gateway": (CASCADE_IN_GATEWAY, ()),
    "cascade-in-gateway-recall-claim": (
        deep_merge(CASCADE_IN_GATEWAY, {"recall": {"bundle": {"existingClaim": "recsys-bundles"}}}),
        (),
    ),
    "auth-existing-secret": ({"gateway": {"auth": {"existingSecret": "shop-tokens"}}}, ()),
    "auth-off-development": ({"gateway": {"auth": {"allowUnauthenticated": True}}}, ()),
    "internal-tls": (INTERNAL_TLS, ()),
    "internal-tls-gateway-only": (
        {
            **INTERNAL_TLS,
            "recall": {"enabled": False},
            "rank": {"enabled": False},
            "gateway": {"recallAddress": "recall.ml:50051", "rankAddress": "rank.ml:50052"},
            "networkPolicy": {"extraEgress": EXTERNAL_MODELS_EGRESS},
        },
        (),
    ),
    "network-policy-hooks": (NETWORK_POLICY_HOOKS, ()),
    "gateway-http-off": ({"gateway": {"http": {"enabled": False}}}, ()),
    "tracing": ({"tracing": {"otlpEndpoint": OTLP_ENDPOINT}}, ()),
    "gateway-http-port-restricted-clients": (
        {"gateway": {"http": {"port": 8081}}, "networkPolicy": {"gatewayFrom": GATEWAY_CLIENTS}},
        (),
    ),
    "fixed-replicas-latency-hpa": (
        {
            "recall": {"autoscaling": {"enabled": False}, "podDisruptionBudget": {"enabled": False}},
            "gateway": {"autoscaling": {"latency": {"enabled": True}}},
            "networkPolicy": {"enabled": False},
            "monitoring": {"dashboard": {"enabled": False}},
        },
        (),
    ),
    "everything-on": (
        {
            **GPU_ON,
            **MONITORING_ON,
            **INTERNAL_TLS,
            **NETWORK_POLICY_HOOKS,
            **INGRESS_GRPC_AND_ROUTE,
            "redis": {"enabled": True},
            "bundles": {"store": BUNDLE_STORE, "env": FETCH_ENV},
            "recall": {**GPU_ON["recall"], **SHARDED["recall"], **EXTENSION_POINTS["recall"]},
            "gateway": {**INGRESS_GRPC_AND_ROUTE["gateway"], **EXTENSION_POINTS["gateway"]},
        },
        (MONITORING_API, GRPC_ROUTE_API),
    ),
}

# Kinds with no built-in schema (Prometheus Operator and Gateway API CRDs): checked by promtool
# and assertions.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "GRPCRoute"}
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}
# Oldest Kubernetes the chart declares (native gRPC probes GA) and the newest schema available.
SCHEMA_VERSIONS = ("1.27.0", "1.37.0")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Manifest]]:
    """Every combination rendered once for the whole module."""
    return {name: manifests(render(values, apis)) for name, (values, apis) in COMBINATIONS.items()}


def containers(pod_owner: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_owner["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def deployment(objects: list[Manifest], component: str) -> dict[str, Any]:
    """The Deployment of a component (or the StatefulSet of a sharded recall)."""
    name = f"{FULLNAME}-{component}"
    (owner,) = [m.body for m in objects if m.kind in WORKLOAD_KINDS and m.name == name]
    return owner


WORKLOAD_KINDS = {"Deployment", "StatefulSet"}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_chart_lints_strict_for_every_combination() -> None:
    helm = helm_sdk()
    for name, (values, _) in COMBINATIONS.items():
        report = helm.lint(
            CHART_DIR, with_bundles(values), strict=True, namespace=NAMESPACE, kube_version=KUBE_VERSION
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, f"{name}: {report}"


@pytest.mark.parametrize("schema_version", SCHEMA_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schema_strictly(
    rendered: dict[str, list[Manifest]], schema_version: str
) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[deploy]')"
    )
    # Objects identical across combinations are validated once.
    unique: dict[str, str] = {}
    for combination, objects in rendered.items():
        assert objects, combination
        for manifest in objects:
            if manifest.kind not in CRD_KINDS:
                where = f"{combination}: {manifest.template} {manifest.kind}/{manifest.name}"
                unique.setdefault(json.dumps(manifest.body, sort_keys=True), where)
    for body, where in unique.items():
        try:
            kubernetes_validate.validate(json.loads(body), schema_version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no Kubernetes {schema_version} schema for this kind")


def test_the_validator_rejects_unknown_fields(rendered: dict[str, list[Manifest]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    body = json.loads(json.dumps(deployment(rendered["default"], "recall")))
    body["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {"grpc": {"port": 50051}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProb"):
        kubernetes_validate.validate(body, KUBE_VERSION, strict=True)


def test_values_schema_rejects_misspelled_keys() -> None:
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match="replica"):
        render({"recall": {"replica": 3}})
    with pytest.raises(helm.HelmError, match="enable"):
        render({"monitoring": {"serviceMonitor": {"enable": True}}})
    report = helm.lint(
        CHART_DIR, with_bundles({"gateway": {"confg": {}}}), strict=True, kube_version=KUBE_VERSION
    )
    assert report["errors"] or any(m["severity"] >= 2 for m in report["messages"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"recall": {"bundle": {"url": "https://m.example/r.tar", "existingClaim": "c"}}},
            "not existingClaim and url",
        ),
        ({"rank": {"bundle": {"store": "s3://b/p", "url": "https://m.example/r.tar"}}}, "not url and store"),
        ({"rank": {"bundle": {"sha256": ""}}}, r"rank\.bundle\.sha256 is required"),
        ({"recall": {"bundle": {"version": ""}}}, r"recall\.bundle\.version is required"),
        ({"bundles": {"store": ""}}, "no source: set bundles.store"),
        ({"rank": {"shards": 2}}, "only recall is sharded"),
        (
            {"gateway": {"http": {"enabled": False}, "ingress": {"enabled": True}}},
            "needs gateway.http.enabled",
        ),
        ({"gateway": {"grpcRoute": {"enabled": True}}}, None),  # no API: skipped, no parentRefs needed
        ({"recall": {"enabled": False}}, "recallAddress is required"),
        ({"rank": {"inGateway": True, "enabled": False}}, "rank.inGateway needs rank.enabled"),
        (
            {
                "rank": {"inGateway": True},
                "gateway": {"rankAddress": "rank.ml:50052"},
                "networkPolicy": {"egress": {"enabled": False}},
            },
            "contradict each other",
        ),
        ({"rank": {"inGateway": True, "gpu": {"enabled": True}}}, "set rank.gpu.enabled: false"),
        ({"recall": {"inGateway": True, "enabled": False}}, "recall.inGateway needs recall.enabled"),
        (
            {
                "recall": {"inGateway": True},
                "gateway": {"recallAddress": "recall.ml:50051"},
                "networkPolicy": {"egress": {"enabled": False}},
            },
            "gateway.recallAddress and recall.inGateway contradict each other",
        ),
        ({"recall": {"inGateway": True, "shards": 2}}, "set recall.shards: 1"),
        ({"recall": {"inGateway": True, "gpu": {"enabled": True}}}, "set recall.gpu.enabled: false"),
        ({"redis": {"enabled": True, "externalUrl": "redis://r:6379/0"}}, "not both"),
        ({"redis": {"externalUrl": "redis://r:6379/0"}}, "not both"),  # Redis in-cluster by default
    ],
)
def test_contradictory_values_fail_with_a_message(values: dict[str, Any], message: str | None) -> None:
    helm = helm_sdk()
    if message is None:
        render(values)
        return
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_each_component_is_switchable(rendered: dict[str, list[Manifest]]) -> None:
    default = {m.name for m in rendered["default"] if m.kind == "Deployment"}
    assert default == {f"{FULLNAME}-{c}" for c in (*COMPONENTS, "redis")}  # Redis: the history store
    gateway_only = rendered["gateway-only"]
    gateway_and_its_store = {f"{FULLNAME}-gateway", f"{FULLNAME}-redis"}
    assert {m.name for m in gateway_only if m.kind == "Deployment"} == gateway_and_its_store
    assert not [m for m in gateway_only if "recall" in m.name or "rank" in m.name]
    env = env_of(deployment(gateway_only, "gateway")["spec"]["template"]["spec"]["containers"][0])
    assert env["RECSYS_RECALL_ADDRESS"] == "recall.ml:50051"
    assert env["RECSYS_RANK_ADDRESS"] == "rank.ml:50052"


def test_tracing_is_off_by_default_and_one_value_points_every_component_at_a_collector(
    rendered: dict[str, list[Manifest]],
) -> None:
    for component in COMPONENTS:
        default = deployment(rendered["default"], component)["spec"]["template"]["spec"]["containers"][0]
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env_of(default)
        traced = deployment(rendered["tracing"], component)["spec"]["template"]["spec"]["containers"][0]
        assert env_of(traced)["OTEL_EXPORTER_OTLP_ENDPOINT"] == OTLP_ENDPOINT


def test_probes_are_native_grpc_on_the_grpc_port_with_a_startup_budget(
    rendered: dict[str, list[Manifest]],
) -> None:
    for component in COMPONENTS:
        (container,) = deployment(rendered["default"], component)["spec"]["template"]["spec"]["containers"]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        # The gateway also serves its HTTP/JSON API; the probes stay on gRPC all the same.
        assert set(ports) == ({"grpc", "metrics", "http"} if component == "gateway" else {"grpc", "metrics"})
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[probe_name]
            assert probe["grpc"]["port"] == ports["grpc"], (component, probe_name)
            assert not {"httpGet", "exec", "tcpSocket"} & set(probe)
        startup = container["startupProbe"]
        budget_s = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget_s >= (300 if component != "gateway" else 60), (component, budget_s)
        env = env_of(container)
        assert env["RECSYS_PORT"] == str(ports["grpc"])
        assert env["RECSYS_METRICS_PORT"] == str(ports["metrics"])


def test_every_pod_is_hardened(rendered: dict[str, list[Manifest]]) -> None:
    for combination, objects in rendered.items():
        for owner in (m for m in objects if m.kind in WORKLOAD_KINDS):
            pod = owner.body["spec"]["template"]["spec"]
            where = f"{combination}: {owner.name}"
            assert pod["automountServiceAccountToken"] is False, where
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
            for container in containers(owner.body):
                context = container["securityContext"]
                assert context["runAsNonRoot"] is True, where
                assert context["readOnlyRootFilesystem"] is True, where
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"]["drop"] == ["ALL"], where
                assert context["seccompProfile"]["type"] == "RuntimeDefault", where
                assert "limits" in container["resources"] and "requests" in container["resources"], where
        (account,) = [m.body for m in objects if m.kind == "ServiceAccount"]
        assert account["automountServiceAccountToken"] is False


def test_gpu_scheduling_only_when_enabled(rendered: dict[str, list[Manifest]]) -> None:
    for component in ("recall", "rank"):
        cpu = deployment(rendered["default"], component)
        gpu = deployment(rendered["gpu"], component)
        (cpu_container,) = cpu["spec"]["template"]["spec"]["containers"]
        (gpu_container,) = gpu["spec"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in json.dumps(cpu)
        assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
        # A GPU pod's own host resources: the CUDA context and libraries need more than the CPU pod.
        assert gpu_container["resources"]["limits"]["memory"] == "8Gi"
        assert gpu_container["resources"]["requests"] == {"cpu": "2", "memory": "4Gi"}
        assert cpu_container["resources"]["limits"] == {"memory": "2Gi"}
        assert env_of(gpu_container)["RECSYS_THREADS"] == "2"  # the GPU pod's CPU request
        assert gpu_container["image"].endswith("-gpu") and not cpu_container["image"].endswith("-gpu")
        assert env_of(gpu_container)["RECSYS_DEVICE"] == "gpu"
        assert env_of(cpu_container)["RECSYS_DEVICE"] == "auto"
        pod = gpu["spec"]["template"]["spec"]
        # No pool label assumed (they differ per cloud): the GPU request picks GPU nodes; the
        # usual nvidia.com/gpu taint is tolerated.
        assert "nodeSelector" not in pod
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert "nodeSelector" not in cpu["spec"]["template"]["spec"]
        assert "tolerations" not in cpu["spec"]["template"]["spec"]
    assert "nvidia.com" not in json.dumps(deployment(rendered["gpu"], "gateway"))
    pinned = {"gpu": {"nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}, **GPU_ON}
    pod = deployment(manifests(render(pinned)), "rank")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_monitoring_objects_need_the_value_and_the_api(rendered: dict[str, list[Manifest]]) -> None:
    assert not kinds(rendered["default"]) & MONITORING_KINDS
    assert not kinds(rendered["monitoring-without-api"]) & MONITORING_KINDS
    # The API alone is not enough either.
    assert not kinds(manifests(render({}, (MONITORING_API,)))) & MONITORING_KINDS
    assert kinds(rendered["monitoring-with-api"]) >= MONITORING_KINDS
    notes = render(MONITORING_ON)["recsys/templates/NOTES.txt"]
    assert "no ServiceMonitor was created" in notes


def test_service_monitor_scrapes_the_metrics_port_of_each_service(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["monitoring-with-api"]
    monitor = find(objects, "ServiceMonitor", FULLNAME)["spec"]
    assert monitor["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == "metrics"
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "job" and relabel["replacement"] == "recsys-$1"
    (expression,) = monitor["selector"]["matchExpressions"]
    scraped = []
    for service in (m.body for m in objects if m.kind == "Service"):
        labels = service["metadata"]["labels"]
        chosen = (
            selects(monitor["selector"]["matchLabels"], labels)
            and labels.get(expression["key"]) in (expression["values"])
        )
        if chosen and any(port["name"] == "metrics" for port in service["spec"]["ports"]):
            scraped.append(labels["app.kubernetes.io/component"])
    assert sorted(scraped) == sorted(COMPONENTS)


def test_prometheus_rule_is_the_shipped_alert_file(rendered: dict[str, list[Manifest]]) -> None:
    rule = find(rendered["monitoring-with-api"], "PrometheusRule", FULLNAME)
    shipped = yaml.safe_load((DEPLOY_DIR / "prometheus" / "alerts.yaml").read_text())
    assert rule["spec"] == shipped


def test_network_policy_lets_only_the_gateway_call_recall_and_rank(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["redis"]
    gateway_pod_labels = deployment(objects, "gateway")["spec"]["template"]["metadata"]["labels"]
    prometheus_labels = {"app.kubernetes.io/name": "prometheus"}
    for component in ("recall", "rank", "redis"):
        policy = find(objects, "NetworkPolicy", f"{FULLNAME}-{component}")["spec"]
        pod_labels = deployment(objects, component)["spec"]["template"]["metadata"]["labels"]
        assert selects(policy["podSelector"]["matchLabels"], pod_labels)
        assert policy["policyTypes"] == ["Ingress"]
        for rule in policy["ingress"]:
            (peer,) = rule["from"]
            ports = [port["port"] for port in rule["ports"]]
            if ports == ["metrics"]:
                assert peer["podSelector"]["matchLabels"] == prometheus_labels
            else:
                assert ports in (["grpc"], ["redis"]), (component, ports)
                assert set(peer) == {"podSelector"}, "a pod selector without a namespace: this namespace"
                assert selects(peer["podSelector"]["matchLabels"], gateway_pod_labels)
                # Not too broad: the gateway's selector must not pick the component's own pods.
                assert not selects(peer["podSelector"]["matchLabels"], pod_labels)
    gateway_policy = find(objects, "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]
    client_rule = next(r for r in gateway_policy["ingress"] if r["ports"][0]["port"] == "grpc")
    assert "from" not in client_rule  # default: any client may reach the gateway's gRPC port


def gateway_env(objects: list[Manifest]) -> dict[str, Any]:
    return env_of(deployment(objects, "gateway")["spec"]["template"]["spec"]["containers"][0])


def test_the_default_history_store_is_a_shared_persistent_password_protected_redis(
    rendered: dict[str, list[Manifest]],
) -> None:
    """Every gateway replica shares one history that survives rollouts, evictions and scale-down."""
    objects = rendered["default"]
    secret_name = f"{FULLNAME}-redis"
    env = gateway_env(objects)
    assert env["RECSYS_HISTORY_BACKEND"] == "redis"
    assert env["RECSYS_REDIS_URL"] == {"secretKeyRef": {"name": secret_name, "key": "url"}}
    assert "RECSYS_SQLITE_PATH" not in env

    secret = find(objects, "Secret", secret_name)["data"]
    password = base64.b64decode(secret["password"]).decode()
    assert len(password) >= 32
    assert base64.b64decode(secret["url"]).decode() == (
        f"redis://:{password}@{FULLNAME}-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    )

    redis = deployment(objects, "redis")
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["strategy"] == {"type": "Recreate"}
    pod = redis["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"  # on disk before the gateway's reply
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env_of(container)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": secret_name, "key": "password"}}
    data = next(v for v in pod["volumes"] if v["name"] == "data")
    assert data == {"name": "data", "persistentVolumeClaim": {"claimName": f"{FULLNAME}-redis"}}
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    claim = find(objects, "PersistentVolumeClaim", f"{FULLNAME}-redis")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"

    service = find(objects, "Service", f"{FULLNAME}-redis")
    assert service["spec"]["ports"][0]["port"] == 6379
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    # The gateway may scale: the HPA is on and its replicas share the one history.
    assert find(objects, "HorizontalPodAutoscaler", f"{FULLNAME}-gateway")


def test_redis_alternatives_own_password_or_managed(rendered: dict[str, list[Manifest]]) -> None:
    own = rendered["redis-own-password-everysec"]
    assert not [m for m in own if m.kind == "Secret" and "redis" in m.name]  # the chart generates none
    assert gateway_env(own)["RECSYS_REDIS_URL"] == {"secretKeyRef": {"name": "my-redis", "key": "url"}}
    (container,) = deployment(own, "redis")["spec"]["template"]["spec"]["containers"]
    assert container["args"][container["args"].index("--appendfsync") + 1] == "everysec"
    assert env_of(container)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "my-redis", "key": "password"}}

    for combination, url in (
        ("redis-external-secret", {"secretKeyRef": {"name": "history-redis", "key": "url"}}),
        ("redis-external-url-no-egress-policy", "redis://r.example:6379/0"),
    ):
        objects = rendered[combination]
        env = gateway_env(objects)
        assert env["RECSYS_HISTORY_BACKEND"] == "redis" and env["RECSYS_REDIS_URL"] == url
        assert not [m for m in objects if "redis" in m.name], combination  # no in-cluster Redis


def test_sqlite_history_runs_only_as_one_gateway_on_a_claim(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["sqlite-single-node"]
    env = gateway_env(objects)
    assert env["RECSYS_HISTORY_BACKEND"] == "sqlite" and env["RECSYS_SQLITE_PATH"].startswith("/data/")
    assert "RECSYS_REDIS_URL" not in env
    gateway = deployment(objects, "gateway")
    assert gateway["spec"]["replicas"] == 1 and gateway["spec"]["strategy"] == {"type": "Recreate"}
    data = next(v for v in gateway["spec"]["template"]["spec"]["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"] == {"claimName": "history"}
    assert not [m for m in objects if "redis" in m.name]
    assert not [m for m in objects if m.kind == "HorizontalPodAutoscaler" and "gateway" in m.name]


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ({"replicas": 1, "history": {"existingClaim": "history"}}, "one history per pod"),  # HPA on
        ({"replicas": 2, "autoscaling": {"enabled": False}, "history": {"existingClaim": "h"}}, "per pod"),
        ({"replicas": 1, "autoscaling": {"enabled": False}}, "needs gateway.history.existingClaim"),
    ],
)
def test_sqlite_history_that_would_split_or_lose_events_is_refused(
    gateway: dict[str, Any], message: str
) -> None:
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match=message):
        render({"redis": {"enabled": False}, "gateway": gateway})


def test_gateway_dials_the_headless_services_of_this_release(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["default"]
    env = env_of(deployment(objects, "gateway")["spec"]["template"]["spec"]["containers"][0])
    for component, variable in (("recall", "RECSYS_RECALL_ADDRESS"), ("rank", "RECSYS_RANK_ADDRESS")):
        match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", env[variable])
        assert match, env[variable]
        service = find(objects, "Service", match.group(1))
        assert service["spec"]["clusterIP"] == "None" and match.group(2) == NAMESPACE
        assert service["spec"]["ports"][0]["port"] == int(match.group(3))
        pod_labels = deployment(objects, component)["spec"]["template"]["metadata"]["labels"]
        assert selects(service["spec"]["selector"], pod_labels)


def test_every_env_var_is_a_documented_setting(rendered: dict[str, list[Manifest]]) -> None:
    """Every RECSYS_*/OTEL_* variable the chart sets is a documented setting (extraEnv and the
    fetch container's cloud SDK variables are the user's own)."""
    conventions = (REPO_ROOT / "docs" / "CONVENTIONS.md").read_text()
    documented = set(re.findall(r"`((?:RECSYS|OTEL)_[A-Z_]+)(?:`|=)", conventions))  # `X` or `X=1`
    for combination, objects in rendered.items():
        for owner in (m for m in objects if m.kind in WORKLOAD_KINDS and "redis" not in m.name):
            for container in containers(owner.body):
                ours = {name for name in env_of(container) if name.startswith(("RECSYS_", "OTEL_"))}
                unknown = ours - documented
                assert not unknown, f"{combination}: {owner.name} sets undocumented {sorted(unknown)}"


def test_scenario_config_is_a_directory_mounted_configmap_of_the_shipped_file(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["default"]
    gateway = deployment(objects, "gateway")["spec"]["template"]["spec"]
    (container,) = gateway["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "scenarios")
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    volume = next(v for v in gateway["volumes"] if v["name"] == "scenarios")
    config_map = find(objects, "ConfigMap", volume["configMap"]["name"])
    (key,) = config_map["data"]
    assert env_of(container)["RECSYS_SCENARIOS"] == f"{mount['mountPath']}/{key}"
    shipped = yaml.safe_load((REPO_ROOT / "config" / "scenarios.yaml").read_text())
    assert yaml.safe_load(config_map["data"][key]) == shipped

    override = {"scenarios": {"home": {"k": 5}}}
    custom = manifests(render({"gateway": {"scenarios": override}}))
    assert yaml.safe_load(find(custom, "ConfigMap", f"{FULLNAME}-scenarios")["data"][key]) == override


def fetch_container(objects: list[Manifest], component: str) -> dict[str, Any]:
    (fetch,) = deployment(objects, component)["spec"]["template"]["spec"]["initContainers"]
    return fetch


def fetch_args(fetch: dict[str, Any]) -> dict[str, str]:
    assert fetch["command"][:2] == ["python", "/opt/recsys/fetch/fetch_bundle.py"]
    return dict(zip(fetch["command"][2::2], fetch["command"][3::2], strict=True))


def test_default_bundles_are_versioned_immutable_objects_fetched_per_pod(
    rendered: dict[str, list[Manifest]],
) -> None:
    """No shared volume, nothing overwritten in place: each pod fetches <store>/<name>/<version>.tar,
    checks it, and carries the version as an annotation."""
    objects = rendered["default"]
    for component in ("recall", "rank"):
        bundle = BUNDLE_VALUES[component]["bundle"]
        owner = deployment(objects, component)
        pod = owner["spec"]["template"]["spec"]
        url = f"{BUNDLE_STORE}/{component}/{bundle['version']}.tar"
        assert fetch_args(fetch_container(objects, component)) == {
            "--url": url,
            "--version": bundle["version"],
            "--sha256": bundle["sha256"],
            "--dest": f"/bundles/{component}",
        }
        assert {"name": "HOME", "value": "/tmp"} in fetch_container(objects, component)["env"]
        bundle_volume = next(v for v in pod["volumes"] if v["name"] == "bundle")
        assert set(bundle_volume) == {"name", "emptyDir"}, "the pod's own copy, no shared claim"
        assert "persistentVolumeClaim" not in json.dumps(pod)
        annotations = owner["spec"]["template"]["metadata"]["annotations"]
        assert annotations["recsys/bundle-version"] == bundle["version"]
        assert annotations["recsys/bundle-sha256"] == bundle["sha256"]
        assert annotations["recsys/bundle-source"] == url
        (container,) = pod["containers"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "bundle")
        assert mount["readOnly"] is True and env_of(container)["RECSYS_BUNDLE"] == mount["mountPath"]
    script = find(objects, "ConfigMap", f"{FULLNAME}-fetch-bundle")["data"]["fetch_bundle.py"]
    assert script.strip() == (CHART_DIR / "files" / "fetch_bundle.py").read_text().strip()
    notes = render({})["recsys/templates/NOTES.txt"]
    assert f"recall: {BUNDLE_VALUES['recall']['bundle']['version']} from {BUNDLE_STORE}/recall/" in notes


def test_a_new_version_rolls_the_pods_and_the_old_values_bring_the_old_model_back() -> None:
    """What `helm upgrade --set rank.bundle.version=...` and `helm rollback` rely on: the pod
    template is a function of the version, so it changes with it and returns with it."""
    old = deployment(manifests(render({})), "rank")["spec"]["template"]
    new_values = {"rank": {"bundle": {"version": "rank-20261202T060000", "sha256": "3" * 64}}}
    new = deployment(manifests(render(new_values)), "rank")["spec"]["template"]
    assert old != new
    assert new["metadata"]["annotations"]["recsys/bundle-version"] == "rank-20261202T060000"
    assert "rank-20261202T060000.tar" in fetch_args(new["spec"]["initContainers"][0])["--url"]
    assert deployment(manifests(render({})), "rank")["spec"]["template"] == old  # rollback: same values


def test_no_model_ships_without_a_version() -> None:
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match=r"bundle\.version is required"):
        render({}, bundles=False)
    with pytest.raises(helm.HelmError, match="version"):
        render({"recall": {"bundle": {"version": "latest/../x"}}})  # the schema's version pattern
    # The gateway alone needs no bundle.
    render(
        {
            "recall": {"enabled": False},
            "rank": {"enabled": False},
            "gateway": {"recallAddress": "recall.ml:50051", "rankAddress": "rank.ml:50052"},
            "networkPolicy": {"egress": {"enabled": False}},
        },
        bundles=False,
    )


def test_other_bundle_sources_are_versioned_too(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["bundle-url"]
    recall_args = fetch_args(fetch_container(objects, "recall"))
    assert recall_args["--url"] == "https://models.example/recall.tgz" and recall_args["--sha256"] == SHA256
    assert recall_args["--version"] == BUNDLE_VALUES["recall"]["bundle"]["version"]
    assert fetch_args(fetch_container(objects, "rank"))["--url"].startswith("gs://")

    # A claim: the version's own folder, read-only, no init container.
    objects = rendered["bundle-claim"]
    for component, folder in (("recall", "recall"), ("rank", "models/rank")):
        pod = deployment(objects, component)["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        claim = next(v for v in pod["volumes"] if v["name"] == "bundle")
        assert claim["persistentVolumeClaim"] == {"claimName": "recsys-bundles", "readOnly": True}
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "bundle")
        version = BUNDLE_VALUES[component]["bundle"]["version"]
        assert mount["readOnly"] is True and mount["subPath"] == f"{folder}/{version}"
    assert not [m for m in objects if m.name == f"{FULLNAME}-fetch-bundle"]


def test_the_fetch_container_takes_store_credentials_and_an_endpoint(
    rendered: dict[str, list[Manifest]],
) -> None:
    fetch = fetch_container(rendered["everything-on"], "rank")
    assert fetch["env"][1:] == FETCH_ENV
    assert fetch["resources"]["limits"]["memory"] == "512Mi"
    assert fetch["securityContext"]["readOnlyRootFilesystem"] is True


def test_autoscalers_and_disruption_budgets_target_the_deployments(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["default"]
    for component in COMPONENTS:
        target = deployment(objects, component)
        assert "replicas" not in target["spec"], "the HPA owns the replica count"
        hpa = find(objects, "HorizontalPodAutoscaler", target["metadata"]["name"])["spec"]
        assert hpa["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": target["metadata"]["name"],
        }
        assert [metric["type"] for metric in hpa["metrics"]] == ["Resource"]
        pdb = find(objects, "PodDisruptionBudget", target["metadata"]["name"])["spec"]
        assert selects(pdb["selector"]["matchLabels"], target["spec"]["template"]["metadata"]["labels"])

    tuned = rendered["fixed-replicas-latency-hpa"]
    assert deployment(tuned, "recall")["spec"]["replicas"] == 2
    assert not [
        m
        for m in tuned
        if m.kind in {"HorizontalPodAutoscaler", "PodDisruptionBudget"} and "recall" in m.name
    ]
    gateway_hpa = find(tuned, "HorizontalPodAutoscaler", f"{FULLNAME}-gateway")["spec"]
    latency = gateway_hpa["metrics"][1]
    assert latency["type"] == "Pods"
    assert latency["pods"]["target"] == {"type": "AverageValue", "averageValue": "100m"}
    assert not kinds(tuned) & {"NetworkPolicy"}


def test_dashboard_configmap_ships_the_dashboard_file(rendered: dict[str, list[Manifest]]) -> None:
    config_map = find(rendered["default"], "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (payload,) = config_map["data"].values()
    assert json.loads(payload) == json.loads((DEPLOY_DIR / "grafana" / "recsys-dashboard.json").read_text())
    assert not [m for m in rendered["fixed-replicas-latency-hpa"] if m.name == f"{FULLNAME}-dashboard"]


# -- gateway authentication ----------------------------------------------------------------------

AUTH_SECRET = f"{FULLNAME}-gateway-auth"


def gateway_pod(objects: list[Manifest]) -> dict[str, Any]:
    return deployment(objects, "gateway")["spec"]["template"]["spec"]


def volume(pod: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((v for v in pod["volumes"] if v["name"] == name), None)


def mount(container: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in container.get("volumeMounts", []) if m["name"] == name), None)


def mounted_tokens_file(objects: list[Manifest]) -> tuple[str, str]:
    """(Secret name, key) of the tokens file RECSYS_AUTH_TOKENS_FILE points at, checked to be a
    read-only directory mount (so a changed Secret reaches the pod) of that key alone."""
    pod = gateway_pod(objects)
    (container,) = pod["containers"]
    path = env_of(container)["RECSYS_AUTH_TOKENS_FILE"]
    tokens_mount = mount(container, "auth-tokens")
    assert tokens_mount and tokens_mount["readOnly"] is True and "subPath" not in tokens_mount
    directory, _, filename = path.rpartition("/")
    assert directory == tokens_mount["mountPath"]
    secret = volume(pod, "auth-tokens")["secret"]
    (item,) = secret["items"]  # only the digests: never the raw tokens
    assert item["path"] == filename
    return secret["secretName"], item["key"]


def test_default_install_requires_the_generated_bearer_tokens(
    rendered: dict[str, list[Manifest]], tmp_path: Any
) -> None:
    from gateway.server import GATEWAY_ACCESS
    from recsys.serving.auth import BearerAuthInterceptor, TokenFile, Unauthorized, bearer_metadata

    objects = rendered["default"]
    assert mounted_tokens_file(objects) == (AUTH_SECRET, "tokens.yaml")
    env = gateway_env(objects)
    assert "RECSYS_ALLOW_UNAUTHENTICATED" not in env

    data = find(objects, "Secret", AUTH_SECRET)["data"]
    assert set(data) == {"token", "admin-token", "tokens.yaml"}
    token, admin = (base64.b64decode(data[key]).decode() for key in ("token", "admin-token"))
    assert len(token) >= 43 and len(admin) >= 43 and token != admin  # >= 256 bits each
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_bytes(base64.b64decode(data["tokens.yaml"]))
    assert token not in tokens_file.read_text() and admin not in tokens_file.read_text()

    # The gateway's own loader and policy accept the file and give each token its scopes.
    auth = BearerAuthInterceptor(TokenFile(tokens_file), GATEWAY_ACCESS)
    method = "/recsys.v1.Gateway/{}".format
    assert auth.check(method("Recommend"), bearer_metadata(token)).scopes == {"recommend", "events"}
    auth.check(method("LogEvents"), bearer_metadata(token))
    with pytest.raises(Unauthorized, match="needs scope 'admin'"):
        auth.check(method("ForgetUser"), bearer_metadata(token))
    assert auth.check(method("ForgetUser"), bearer_metadata(admin)).scopes == {"recommend", "debug", "admin"}
    with pytest.raises(Unauthorized, match="missing"):
        auth.check(method("Recommend"), ())
    # The probes send no token: the health service must stay open.
    assert GATEWAY_ACCESS.is_open("/grpc.health.v1.Health/Check")

    notes = render({})["recsys/templates/NOTES.txt"]
    assert f"get secret {AUTH_SECRET} -o jsonpath='{{.data.token}}' | base64 -d" in notes
    assert '-H "authorization: Bearer $TOKEN"' in notes


def test_a_users_tokens_secret_replaces_the_generated_one(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["auth-existing-secret"]
    assert mounted_tokens_file(objects) == ("shop-tokens", "tokens.yaml")
    assert not [m for m in objects if m.kind == "Secret" and m.name == AUTH_SECRET]
    assert "RECSYS_ALLOW_UNAUTHENTICATED" not in gateway_env(objects)


def test_allow_unauthenticated_drops_the_tokens_and_says_so(rendered: dict[str, list[Manifest]]) -> None:
    helm = helm_sdk()
    objects = rendered["auth-off-development"]
    env = gateway_env(objects)
    assert env["RECSYS_ALLOW_UNAUTHENTICATED"] == "1"
    assert "RECSYS_AUTH_TOKENS_FILE" not in env  # a tokens file would win over the switch
    assert volume(gateway_pod(objects), "auth-tokens") is None
    assert not [m for m in objects if m.name == AUTH_SECRET]
    assert (
        "WARNING: gateway.auth.allowUnauthenticated"
        in render(COMBINATIONS["auth-off-development"][0])["recsys/templates/NOTES.txt"]
    )
    with pytest.raises(helm.HelmError, match="not both"):
        render({"gateway": {"auth": {"existingSecret": "t", "allowUnauthenticated": True}}})


# -- limits ----------------------------------------------------------------------------------------


def test_gateway_limits_are_the_code_defaults_and_shed_before_the_rpc_cap(
    rendered: dict[str, list[Manifest]],
) -> None:
    from gateway.config import GATEWAY_MAX_CONCURRENT_RPCS, GATEWAY_MAX_MESSAGE_BYTES, GatewayConfig

    env = gateway_env(rendered["default"])
    assert int(env["RECSYS_MAX_IN_FLIGHT"]) == GatewayConfig.max_in_flight
    assert int(env["RECSYS_MAX_CONCURRENT_RPCS"]) == GATEWAY_MAX_CONCURRENT_RPCS
    assert int(env["RECSYS_MAX_MESSAGE_BYTES"]) == GATEWAY_MAX_MESSAGE_BYTES
    assert int(env["RECSYS_MAX_IN_FLIGHT"]) < int(env["RECSYS_MAX_CONCURRENT_RPCS"])
    assert float(env["RECSYS_DOWNSTREAM_MAX_HOLD_MS"]) == GatewayConfig.downstream_max_hold_ms
    held = gateway_env(manifests(render({"gateway": {"config": {"downstreamMaxHoldMs": 12.5}}})))
    assert held["RECSYS_DOWNSTREAM_MAX_HOLD_MS"] == "12.5"
    for component in COMPONENTS:
        env = env_of(deployment(rendered["default"], component)["spec"]["template"]["spec"]["containers"][0])
        assert (env["RECSYS_MAX_CONNECTION_AGE_S"], env["RECSYS_MAX_CONNECTION_AGE_GRACE_S"]) == ("60", "10")
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match=r"must be below gateway\.config\.maxConcurrentRpcs"):
        render({"gateway": {"config": {"maxInFlight": 256}}})


@pytest.mark.parametrize(
    ("cpu_request", "threads", "expected"),
    [("1", "auto", "1"), ("2500m", "auto", "2"), ("500m", "auto", "1"), (4, "auto", "4"), ("1", 3, "3")],
)
def test_model_threads_follow_the_cpu_request(cpu_request: Any, threads: Any, expected: str) -> None:
    component = {"resources": {"requests": {"cpu": cpu_request}}, "config": {"threads": threads}}
    objects = manifests(render({"recall": component, "rank": component}))
    for name in ("recall", "rank"):
        env = env_of(deployment(objects, name)["spec"]["template"]["spec"]["containers"][0])
        assert env["RECSYS_THREADS"] == expected, (name, cpu_request, threads)
        assert (env["RECSYS_MAX_WAIT_MS"], env["RECSYS_MAX_QUEUE"]) == ("0", "256")


# -- internal mutual TLS ---------------------------------------------------------------------------


def test_internal_tls_mounts_each_components_secret_and_points_the_settings_at_it(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["internal-tls"]
    secrets = {"recall": f"{FULLNAME}-recall-tls", "rank": "rank-cert", "gateway": f"{FULLNAME}-gateway-tls"}
    script = find(objects, "ConfigMap", f"{FULLNAME}-probe")["data"]["grpc_health_probe.py"]
    assert script.strip() == (CHART_DIR / "files" / "grpc_health_probe.py").read_text().strip()
    for component, secret_name in secrets.items():
        pod = deployment(objects, component)["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = env_of(container)
        tls_mount = mount(container, "tls")
        assert tls_mount["readOnly"] is True and "subPath" not in tls_mount
        assert volume(pod, "tls")["secret"]["secretName"] == secret_name
        files = {key: f"{tls_mount['mountPath']}/{key}" for key in ("tls.crt", "tls.key", "ca.crt")}
        assert env["RECSYS_TLS_CERT"] == files["tls.crt"] and env["RECSYS_TLS_KEY"] == files["tls.key"]
        if component == "gateway":
            # Verifies recall/rank with the CA and presents its certificate as the client's.
            assert env["RECSYS_DOWNSTREAM_TLS_CA"] == files["ca.crt"]
            assert "RECSYS_TLS_CLIENT_CA" not in env
        else:
            # Mutual TLS: only clients with a certificate the CA signed (the gateway).
            assert env["RECSYS_TLS_CLIENT_CA"] == files["ca.crt"]
        # kubelet's gRPC probes cannot speak TLS: the shipped script checks health with the pod's
        # own certificate, against the same port and health service.
        probe_dir = mount(container, "probe")["mountPath"]
        assert volume(pod, "probe")["configMap"]["name"] == f"{FULLNAME}-probe"
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = container[probe_name]["exec"]["command"]
            assert command[:2] == ["python", f"{probe_dir}/grpc_health_probe.py"]
            args = dict(zip(command[2::2], command[3::2], strict=True))
            assert args["--port"] == str(port) and args["--service"] == ""
            assert (args["--cert"], args["--key"], args["--ca"]) == (
                files["tls.crt"],
                files["tls.key"],
                files["ca.crt"],
            )
            assert not {"grpc", "httpGet", "tcpSocket"} & set(container[probe_name])
    # Off by default: plaintext, native probes, nothing mounted.
    for component in COMPONENTS:
        pod = deployment(rendered["default"], component)["spec"]["template"]["spec"]
        assert volume(pod, "tls") is None
        assert not {k for k in env_of(pod["containers"][0]) if "TLS" in k}
    assert not [m for m in rendered["default"] if m.name == f"{FULLNAME}-probe"]
    only = rendered["internal-tls-gateway-only"]
    assert env_of(gateway_pod(only)["containers"][0])["RECSYS_DOWNSTREAM_TLS_CA"].endswith("/ca.crt")


# -- NetworkPolicy: ingress hooks, the gateway's egress --------------------------------------------


def pod_labels(objects: list[Manifest], component: str) -> dict[str, str]:
    return deployment(objects, component)["spec"]["template"]["metadata"]["labels"]


def container_port(objects: list[Manifest], component: str, name: str) -> int:
    (container,) = deployment(objects, component)["spec"]["template"]["spec"]["containers"]
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_gateway_egress_reaches_only_recall_rank_redis_and_dns(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["default"]
    policy = find(objects, "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    dns, *peers = policy["egress"]
    assert dns["to"][0]["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    reached = {}
    for rule in peers:
        (peer,) = rule["to"]
        assert set(peer) == {"podSelector"}, "this namespace's pods only"
        (port,) = rule["ports"]
        selector = peer["podSelector"]["matchLabels"]
        (component,) = [c for c in (*COMPONENTS, "redis") if selects(selector, pod_labels(objects, c))]
        reached[component] = port["port"]
    assert reached == {
        "recall": container_port(objects, "recall", "grpc"),
        "rank": container_port(objects, "rank", "grpc"),
        "redis": container_port(objects, "redis", "redis"),
    }
    # Recall, rank and Redis keep ingress-only policies.
    for component in ("recall", "rank", "redis"):
        assert find(objects, "NetworkPolicy", f"{FULLNAME}-{component}")["spec"]["policyTypes"] == ["Ingress"]
    objects = rendered["redis-external-url-no-egress-policy"]
    unrestricted = find(objects, "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]
    assert unrestricted["policyTypes"] == ["Ingress"] and "egress" not in unrestricted


def test_network_policy_hooks_add_rules(rendered: dict[str, list[Manifest]]) -> None:
    for combination in ("network-policy-hooks", "everything-on"):
        objects = rendered[combination]
        for component, rules in EXTRA_INGRESS.items():
            policy = find(objects, "NetworkPolicy", f"{FULLNAME}-{component}")["spec"]
            assert policy["ingress"][-1] == rules[0], (combination, component)
            assert len(policy["ingress"]) == (3 if component != "redis" else 2)
        gateway = find(objects, "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]
        assert gateway["egress"][-1] == EXTRA_EGRESS[0]
    external = find(rendered["gateway-only"], "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]["egress"]
    assert len(external) == 3  # DNS, Redis, and the recall/rank namespace: no in-release model pods
    assert external[-1] == EXTERNAL_MODELS_EGRESS[0]
    managed = find(rendered["redis-external-secret"], "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]
    assert managed["egress"][-1] == MANAGED_REDIS_EGRESS[0]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"gateway": {"recallAddress": "recall.ml:50051"}}, "gateway.recallAddress"),
        ({"redis": {"enabled": False, "externalUrl": "redis://r.example:6379/0"}}, "managed Redis"),
    ],
)
def test_egress_to_peers_outside_the_release_must_be_allowed_explicitly(
    values: dict[str, Any], named: str
) -> None:
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match=f"{named}.*networkPolicy.extraEgress"):
        render(values)


def test_large_whole_numbers_render_as_digits() -> None:
    """Values arrive as float64: 1000000 must not reach a service as "1e+06", which it cannot parse."""
    objects = manifests(
        render(
            {
                "recall": {
                    "config": {"maxQueue": 1000000},
                    "env": {"RECSYS_MAX_BATCH": 4096, "X_RATIO": 0.25},
                },
                "gateway": {"config": {"maxConcurrentRpcs": 1000000, "maxInFlight": 999999}},
            }
        )
    )
    recall = env_of(deployment(objects, "recall")["spec"]["template"]["spec"]["containers"][0])
    assert (recall["RECSYS_MAX_QUEUE"], recall["RECSYS_MAX_BATCH"], recall["X_RATIO"]) == (
        "1000000",
        "4096",
        "0.25",
    )
    gateway = gateway_env(objects)
    assert (gateway["RECSYS_MAX_CONCURRENT_RPCS"], gateway["RECSYS_MAX_IN_FLIGHT"]) == ("1000000", "999999")


# -- the gateway's HTTP/JSON API and console --------------------------------------------------------


def service_ports(objects: list[Manifest], component: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in find(objects, "Service", f"{FULLNAME}-{component}")["spec"]["ports"]}


def gateway_client_rule(objects: list[Manifest]) -> dict[str, Any]:
    """The gateway's ingress rule for its clients (the one that opens the grpc port)."""
    policy = find(objects, "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]
    (rule,) = [r for r in policy["ingress"] if "grpc" in [p["port"] for p in r["ports"]]]
    return rule


def test_gateway_http_port_is_on_the_container_the_service_and_the_network_policy(
    rendered: dict[str, list[Manifest]],
) -> None:
    from gateway.config import DEFAULT_HTTP_PORT

    for combination, port in (
        ("default", DEFAULT_HTTP_PORT),
        ("internal-tls", DEFAULT_HTTP_PORT),
        ("everything-on", DEFAULT_HTTP_PORT),
        ("gateway-http-port-restricted-clients", 8081),
    ):
        objects = rendered[combination]
        assert container_port(objects, "gateway", "http") == port, combination
        env = gateway_env(objects)
        assert (env["RECSYS_HTTP"], env["RECSYS_HTTP_PORT"]) == ("1", str(port)), combination
        http = service_ports(objects, "gateway")["http"]
        tls = combination in ("internal-tls", "everything-on")  # the HTTP port then serves HTTPS
        assert (http["port"], http["targetPort"], http["protocol"]) == (port, "http", "TCP"), combination
        assert http["appProtocol"] == ("https" if tls else "http"), combination
        # The same clients as gRPC, in the same rule.
        rule = gateway_client_rule(objects)
        assert sorted((p["port"], p["protocol"]) for p in rule["ports"]) == [("grpc", "TCP"), ("http", "TCP")]
        # The probes stay native gRPC (or exec with TLS) on the gRPC port.
        (container,) = gateway_pod(objects)["containers"]
        for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "httpGet" not in container[probe_name], (combination, probe_name)
        # recall and rank have no HTTP API.
        for component in ("recall", "rank"):
            assert "http" not in service_ports(objects, component), (combination, component)
    assert "from" not in gateway_client_rule(rendered["default"])  # default: any client
    restricted = gateway_client_rule(rendered["gateway-http-port-restricted-clients"])
    assert restricted["from"] == GATEWAY_CLIENTS


def test_gateway_http_off_removes_the_port_and_sets_the_switch(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["gateway-http-off"]
    env = gateway_env(objects)
    assert env["RECSYS_HTTP"] == "0" and "RECSYS_HTTP_PORT" not in env
    (container,) = gateway_pod(objects)["containers"]
    assert [p["name"] for p in container["ports"]] == ["grpc", "metrics"]
    assert set(service_ports(objects, "gateway")) == {"grpc", "metrics"}
    assert [p["port"] for p in gateway_client_rule(objects)["ports"]] == ["grpc"]
    assert "http" not in json.dumps(find(objects, "NetworkPolicy", f"{FULLNAME}-gateway")["spec"]["ingress"])
    notes = render(COMBINATIONS["gateway-http-off"][0])["recsys/templates/NOTES.txt"]
    assert "/v1/recommend" not in notes and "8080" not in notes
    default_notes = render({})["recsys/templates/NOTES.txt"]
    assert f"port-forward svc/{FULLNAME}-gateway 8080:8080" in default_notes
    assert '-H "Authorization: Bearer $TOKEN"' in default_notes
    assert "http://localhost:8080/v1/recommend" in default_notes
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match="tls"):
        render({"gateway": {"http": {"enabled": True, "port": 8080, "tls": True}}})  # the schema is strict


@pytest.mark.parametrize("port", [50050, 9090])
def test_gateway_http_port_must_not_collide(port: int) -> None:
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match=r"gateway\.http\.port .* must differ"):
        render({"gateway": {"http": {"port": port}}})
    render({"gateway": {"http": {"enabled": False, "port": port}}})  # off: the port is unused


# -- scheduling, extension points, sharding, publishing the gateway ---------------------------------


def test_replicas_spread_over_zones_and_nodes_by_default(rendered: dict[str, list[Manifest]]) -> None:
    for component in COMPONENTS:
        owner = deployment(rendered["default"], component)
        pod = owner["spec"]["template"]["spec"]
        labels = owner["spec"]["template"]["metadata"]["labels"]
        constraints = pod["topologySpreadConstraints"]
        assert [c["topologyKey"] for c in constraints] == [
            "topology.kubernetes.io/zone",
            "kubernetes.io/hostname",
        ]
        for constraint in constraints:
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"  # a preference, never a blocker
            assert constraint["maxSkew"] == 1 and constraint["matchLabelKeys"] == ["pod-template-hash"]
            assert selects(constraint["labelSelector"]["matchLabels"], labels)
        assert "affinity" not in pod and "priorityClassName" not in pod
    off = {"gateway": {"topologySpread": {"enabled": False}}}
    assert "topologySpreadConstraints" not in gateway_pod(manifests(render(off)))


def test_extension_points_reach_every_pod(rendered: dict[str, list[Manifest]]) -> None:
    for combination in ("extension-points", "everything-on"):
        objects = rendered[combination]
        for component in COMPONENTS:
            if combination == "everything-on" and component == "rank":
                continue  # everything-on sets them on recall and the gateway
            owner = deployment(objects, component)
            pod = owner["spec"]["template"]["spec"]
            labels = owner["spec"]["template"]["metadata"]["labels"]
            where = (combination, component)
            assert pod["priorityClassName"] == "recsys-critical", where
            (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            assert term["topologyKey"] == "kubernetes.io/hostname", where
            assert selects(term["labelSelector"]["matchLabels"], labels), where
            assert pod["topologySpreadConstraints"][-1] == EXTRA_SPREAD, where
            assert len(pod["topologySpreadConstraints"]) == 3, where  # zone, node, the extra one
            assert EXTRA_VOLUME in pod["volumes"], where
            (container,) = pod["containers"]
            assert EXTRA_MOUNT in container["volumeMounts"], where
            assert container["env"][-len(EXTRA_ENV) :] == EXTRA_ENV, where  # valueFrom kept whole
    # A user's own podAntiAffinity wins over the preset; `soft` is a preference.
    own = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    pod = gateway_pod(manifests(render({"gateway": {"podAntiAffinity": "hard", "affinity": own}})))
    assert pod["affinity"] == own
    pod = gateway_pod(manifests(render({"gateway": {"podAntiAffinity": "soft"}})))
    (preferred,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred["weight"] == 100


def test_sharded_recall_is_a_statefulset_the_gateway_dials_shard_by_shard(
    rendered: dict[str, list[Manifest]],
) -> None:
    """The contract with the recall service: RECSYS_RECALL_SHARDS, RECSYS_RECALL_SHARD_INDEX from
    the pod-index label, and the gateway's RECSYS_RECALL_ADDRESSES in shard order."""
    objects = rendered["recall-sharded"]
    (recall,) = [m.body for m in objects if m.kind == "StatefulSet"]
    assert not [m for m in objects if m.kind == "Deployment" and m.name == f"{FULLNAME}-recall"]
    spec = recall["spec"]
    headless = find(objects, "Service", spec["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], spec["template"]["metadata"]["labels"])
    assert spec["replicas"] == 3 and spec["podManagementPolicy"] == "Parallel"
    assert not [m for m in objects if m.kind == "HorizontalPodAutoscaler" and "recall" in m.name]
    assert find(objects, "PodDisruptionBudget", f"{FULLNAME}-recall")
    (container,) = spec["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["RECSYS_RECALL_SHARDS"] == "3"
    assert env["RECSYS_RECALL_SHARD_INDEX"] == {
        "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}
    }
    spread = spec["template"]["spec"]["topologySpreadConstraints"]
    assert {c["matchLabelKeys"][0] for c in spread} == {"controller-revision-hash"}
    gateway = gateway_env(objects)
    assert "RECSYS_RECALL_ADDRESS" not in gateway
    port = container_port(objects, "recall", "grpc")
    domain = f"{NAMESPACE}.svc.cluster.local"
    assert gateway["RECSYS_RECALL_ADDRESSES"].split(",") == [
        f"{FULLNAME}-recall-{i}.{spec['serviceName']}.{domain}:{port}" for i in range(3)
    ]
    # One shard: the Deployment and the one address, as before.
    assert "RECSYS_RECALL_SHARDS" not in env_of(
        deployment(rendered["default"], "recall")["spec"]["template"]["spec"]["containers"][0]
    )
    assert "RECSYS_RECALL_ADDRESSES" not in gateway_env(rendered["default"])
    helm = helm_sdk()
    with pytest.raises(helm.HelmError, match=r"1\.28"):
        render(SHARDED, kube_version="1.27.0")


def test_the_gateway_can_be_published_by_ingress_or_grpc_route(rendered: dict[str, list[Manifest]]) -> None:
    from gateway.config import DEFAULT_HTTP_PORT

    assert not kinds(rendered["default"]) & {"Ingress", "GRPCRoute"}
    ingress = find(rendered["ingress-http"], "Ingress", f"{FULLNAME}-gateway")["spec"]
    assert ingress["ingressClassName"] == "nginx"
    assert ingress["tls"] == [{"secretName": "recsys-tls", "hosts": ["recsys.example.com"]}]
    (rule,) = ingress["rules"]
    (path,) = rule["http"]["paths"]
    assert rule["host"] == "recsys.example.com"
    assert path["backend"]["service"] == {
        "name": f"{FULLNAME}-gateway",
        "port": {"number": DEFAULT_HTTP_PORT},
    }
    assert DEFAULT_HTTP_PORT in [
        p["port"] for p in find(rendered["ingress-http"], "Service", f"{FULLNAME}-gateway")["spec"]["ports"]
    ]

    objects = rendered["ingress-grpc-and-grpc-route"]
    grpc_port = container_port(objects, "gateway", "grpc")
    ingress = find(objects, "Ingress", f"{FULLNAME}-gateway")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["port"]["number"] == grpc_port
    route = find(objects, "GRPCRoute", f"{FULLNAME}-gateway")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"name": "shared", "namespace": "gateway-system"}]
    assert route["spec"]["hostnames"] == ["grpc.recsys.example.com"]
    (route_rule,) = route["spec"]["rules"]
    assert route_rule["matches"] == [{"method": {"type": "Exact", "service": "recsys.v1.Gateway"}}]
    assert route_rule["backendRefs"] == [{"name": f"{FULLNAME}-gateway", "port": grpc_port}]
    # Without the Gateway API the route is skipped and NOTES says so.
    assert "GRPCRoute" not in kinds(rendered["grpc-route-without-api"])
    notes = render(COMBINATIONS["grpc-route-without-api"][0])["recsys/templates/NOTES.txt"]
    assert "no GRPCRoute was created" in notes


def test_prometheus_rule_runbook_links_can_point_at_your_copy() -> None:
    values = {
        **MONITORING_ON,
        "monitoring": {
            **MONITORING_ON["monitoring"],
            "prometheusRule": {"enabled": True, "runbookBaseUrl": "https://wiki.example/recsys-runbook"},
        },
    }
    rule = find(manifests(render(values, (MONITORING_API,))), "PrometheusRule", FULLNAME)
    links = [
        r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r
    ]
    assert links and all(link.startswith("https://wiki.example/recsys-runbook#") for link in links)


def test_rank_in_gateway_runs_the_ranker_in_the_gateway_pods_from_its_own_bundle(
    rendered: dict[str, list[Manifest]],
) -> None:
    """rank.inGateway: no rank workload, Service or policy; the gateway pods run
    recsys.app.inprocess on the serving image, fetch rank's bundle (its version rolls them) and
    take rank.config as RECSYS_RANK_*; their egress no longer reaches rank pods."""
    objects = rendered["rank-in-gateway"]
    assert not [m for m in objects if m.name.startswith(f"{FULLNAME}-rank")]
    gateway = deployment(objects, "gateway")
    template = gateway["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert container["command"] == ["python", "-m", "recsys.app.inprocess"]
    default_rank = deployment(rendered["default"], "rank")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == default_rank["image"], "the serving image (ONNX Runtime), not the gateway's"
    env = env_of(container)
    bundle = BUNDLE_VALUES["rank"]["bundle"]
    assert "RECSYS_RANK_ADDRESS" not in env
    assert {name: env[name] for name in env if name.startswith("RECSYS_RANK_")} == {
        "RECSYS_RANK_BUNDLE": "/bundles/rank",
        "RECSYS_RANK_THREADS": "1",  # "auto": the gateway's 1500m CPU request rounded down
        "RECSYS_RANK_MAX_BATCH": "32",
        "RECSYS_RANK_MAX_WAIT_MS": "0",
        "RECSYS_RANK_MAX_QUEUE": "256",
    }
    assert env["RECSYS_DEVICE"] == "cpu"
    (fetch,) = template["spec"]["initContainers"]
    assert fetch_args(fetch) == {
        "--url": f"{BUNDLE_STORE}/rank/{bundle['version']}.tar",
        "--version": bundle["version"],
        "--sha256": bundle["sha256"],
        "--dest": "/bundles/rank",
    }
    assert fetch["image"] == container["image"]
    assert fetch["name"] == "fetch-rank-bundle"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "rank-bundle")
    assert mount == {"name": "rank-bundle", "mountPath": "/bundles/rank", "readOnly": True}
    assert template["metadata"]["annotations"]["recsys/rank-bundle-version"] == bundle["version"]
    newer = {"rank": {"bundle": {"version": "rank-20261202T060000", "sha256": "3" * 64}}}
    rolled = deployment(manifests(render(deep_merge(RANK_IN_GATEWAY, newer))), "gateway")["spec"]["template"]
    assert rolled["metadata"]["annotations"]["recsys/rank-bundle-version"] == "rank-20261202T060000"
    # The gateway's egress reaches recall and Redis, no rank pods.
    policy = find(objects, "NetworkPolicy", f"{FULLNAME}-gateway")
    peers = json.dumps(policy["spec"]["egress"])
    assert '"app.kubernetes.io/component": "recall"' in peers
    assert '"app.kubernetes.io/component": "rank"' not in peers

    claimed = deployment(rendered["rank-in-gateway-claim"], "gateway")["spec"]["template"]["spec"]
    assert "initContainers" not in claimed  # a claim is mounted, not fetched
    (claimed_container,) = claimed["containers"]
    mount = next(m for m in claimed_container["volumeMounts"] if m["name"] == "rank-bundle")
    assert mount["subPath"] == f"rank/{bundle['version']}" and mount["readOnly"] is True


def test_cascade_in_gateway_serves_recall_and_rank_in_every_gateway_pod(
    rendered: dict[str, list[Manifest]],
) -> None:
    """recall.inGateway with rank.inGateway: the gateway Deployment is the only workload; each pod
    fetches both bundles (one init container each, the fetch script mounted once), mounts them at
    /bundles/<component>, takes each stage's config as RECSYS_<COMPONENT>_*, dials no recall or
    rank address, and rolls when either bundle's version changes."""
    objects = rendered["cascade-in-gateway"]
    workloads = {m.name for m in objects if m.kind in WORKLOAD_KINDS}
    assert workloads == {f"{FULLNAME}-gateway", f"{FULLNAME}-redis"}
    assert not [m for m in objects if m.name.startswith((f"{FULLNAME}-recall", f"{FULLNAME}-rank"))]
    template = deployment(objects, "gateway")["spec"]["template"]
    pod = template["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "recsys.app.inprocess"]
    default_recall = deployment(rendered["default"], "recall")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == default_recall["image"], "the serving image (Faiss, ONNX Runtime)"
    env = env_of(container)
    assert not {"RECSYS_RECALL_ADDRESS", "RECSYS_RECALL_ADDRESSES", "RECSYS_RANK_ADDRESS"} & set(env)
    assert {name: env[name] for name in env if name.startswith("RECSYS_RECALL_")} == {
        "RECSYS_RECALL_BUNDLE": "/bundles/recall",
        "RECSYS_RECALL_THREADS": "2",  # "auto": the gateway's 2-CPU request
        "RECSYS_RECALL_MAX_BATCH": "16",
        "RECSYS_RECALL_MAX_WAIT_MS": "0",
        "RECSYS_RECALL_MAX_QUEUE": "256",
    }
    assert env["RECSYS_RANK_BUNDLE"] == "/bundles/rank" and env["RECSYS_RANK_MAX_BATCH"] == "32"
    assert env["RECSYS_DEVICE"] == "cpu"
    fetches = {fetch["name"]: fetch_args(fetch) for fetch in pod["initContainers"]}
    assert {name: args["--dest"] for name, args in fetches.items()} == {
        "fetch-rank-bundle": "/bundles/rank",
        "fetch-recall-bundle": "/bundles/recall",
    }
    recall_bundle = BUNDLE_VALUES["recall"]["bundle"]
    assert fetches["fetch-recall-bundle"]["--url"] == f"{BUNDLE_STORE}/recall/{recall_bundle['version']}.tar"
    volumes = [volume["name"] for volume in pod["volumes"]]
    assert volumes.count("fetch-script") == 1 and {"recall-bundle", "rank-bundle"} <= set(volumes)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["recall-bundle"] == {
        "name": "recall-bundle",
        "mountPath": "/bundles/recall",
        "readOnly": True,
    }
    annotations = template["metadata"]["annotations"]
    assert annotations["recsys/recall-bundle-version"] == recall_bundle["version"]
    assert annotations["recsys/rank-bundle-version"] == BUNDLE_VALUES["rank"]["bundle"]["version"]
    newer = {"recall": {"bundle": {"version": "recall-20261202T060000", "sha256": "4" * 64}}}
    rolled = deployment(manifests(render(deep_merge(CASCADE_IN_GATEWAY, newer))), "gateway")["spec"][
        "template"
    ]
    assert rolled["metadata"]["annotations"]["recsys/recall-bundle-version"] == "recall-20261202T060000"
    # The gateway's egress reaches neither recall nor rank pods; no policy for either exists.
    policy = find(objects, "NetworkPolicy", f"{FULLNAME}-gateway")
    peers = json.dumps(policy["spec"]["egress"])
    assert '"app.kubernetes.io/component": "recall"' not in peers
    assert '"app.kubernetes.io/component": "rank"' not in peers

    claimed = deployment(rendered["cascade-in-gateway-recall-claim"], "gateway")["spec"]["template"]["spec"]
    (fetch,) = claimed["initContainers"]  # recall's claim is mounted; rank's bundle is still fetched
    assert fetch["name"] == "fetch-rank-bundle"
    assert [volume["name"] for volume in claimed["volumes"]].count("fetch-script") == 1
    claim = next(v for v in claimed["volumes"] if v["name"] == "recall-bundle")
    assert claim["persistentVolumeClaim"] == {"claimName": "recsys-bundles", "readOnly": True}
    mount = next(m for m in claimed["containers"][0]["volumeMounts"] if m["name"] == "recall-bundle")
    assert mount["subPath"] == f"recall/{recall_bundle['version']}"
