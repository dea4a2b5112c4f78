"""The gateway's HTTP/JSON API against the real gateway over fake downstreams: canonical proto3 JSON
in and out, the same validation, auth and degradation as gRPC (one servicer behind both), errors as
HTTP statuses with a JSON body, OpenAPI, health and readiness, and the console's static files."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client import generate_latest

from gateway.config import DEFAULT_HTTP_PORT, GatewayConfig
from gateway.server import GatewayServer, serve
from recsys.serving.metrics import new_registry
from recsys.v1 import gateway_pb2, rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import TEST_TOKEN, FakeStack, gateway_config, tokens_file
from tests.gateway.fakes import FakeRank, FakeRecall, FakeServer
from tests.serving.conftest import _make_ca, _make_leaf

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}
RECOMMEND_ONLY = "recommend-only-token"


def base_url(gateway: GatewayServer) -> str:
    assert gateway.http_port is not None
    return f"http://127.0.0.1:{gateway.http_port}"


@pytest.fixture
async def client(fake_stack: FakeStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url(fake_stack.gateway), timeout=10) as http:
        yield http


async def test_recommend_takes_and_returns_canonical_json(client: httpx.AsyncClient, fake_stack: FakeStack):
    response = await client.post(
        "/v1/recommend", json={"userId": "u1", "scenario": "home", "numItems": 10}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert len(body["items"]) == 10
    first = body["items"][0]
    assert set(first) >= {"itemId", "score", "source"} and first["itemId"].startswith("i")
    assert body["degraded"] is False and body["degradedReasons"] == []
    assert body["modelVersion"] == "rank=fake-rank-1,recall=fake-recall-1"
    assert {t["stage"] for t in body["timings"]} >= {"recall", "rank"}

    # the same servicer answers gRPC: the same items for the same request
    grpc_response = await fake_stack.stub.Recommend(
        gateway_pb2.RecommendRequest(user_id="u1", scenario="home", num_items=10)
    )
    assert [item.item_id for item in grpc_response.items] == [item["itemId"] for item in body["items"]]


async def test_debug_explains_items_and_proto_field_names_are_accepted(client: httpx.AsyncClient):
    request = {"user_id": "u1", "scenario": "item_detail", "num_items": 5, "context": {"item_ids": ["i7"]}}
    response = await client.post("/v1/recommend", json={**request, "debug": True}, headers=AUTH)
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert len(items) == 5 and all(item["explanation"].startswith("recall:") for item in items)
    assert "i7" not in {item["itemId"] for item in items}


async def test_events_are_logged_and_change_the_next_recommendation(client: httpx.AsyncClient):
    async def home() -> list[str]:
        response = await client.post(
            "/v1/recommend", json={"userId": "u9", "scenario": "home", "numItems": 20}, headers=AUTH
        )
        assert response.status_code == 200, response.text
        return [item["itemId"] for item in response.json()["items"]]

    before = await home()
    assert len(before) == 20
    event = {
        "eventId": "http-ev-1",
        "userId": "u9",
        "itemId": before[0],  # home excludes the user's history: it leaves the list
        "type": "ADD_TO_CART",
        "timestampMs": str(int(time.time() * 1000)),  # int64: a string in canonical JSON
    }
    response = await client.post("/v1/events", json={"events": [event]}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 1, "duplicates": 0}
    again = await client.post("/v1/events", json={"events": [event]}, headers=AUTH)
    assert again.json() == {"accepted": 0, "duplicates": 1}  # idempotent by eventId, as on gRPC
    assert await home() != before

    forgotten = await client.post("/v1/forget-user", json={"userId": "u9"}, headers=AUTH)
    assert forgotten.status_code == 200, forgotten.text
    assert forgotten.json() == {"deletedEvents": 1}
    assert (await client.post("/v1/forget-user", json={"userId": "u9"})).status_code == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"userId": "u1", "scenario": "home", "numItems": -1}, "num_items: must be in 0..500, got -1"),
        ({"userId": "u1", "scenario": "nope"}, "scenario: unknown scenario 'nope'"),
        ({"scenario": "home", "numItems": 5}, "user_id: must not be empty"),
        (
            {"userId": "u1", "scenario": "item_detail", "numItems": 5},
            "context.item_ids: required by scenario",
        ),
        ({"userId": "u 1", "scenario": "home", "numItems": 5}, "user_id: must not contain whitespace"),
        ({"userId": "u1", "scenario": "home", "numItems": "ten"}, "num_items: "),
        ({"userId": "u1", "scenario": "home", "numItem": 3}, "numItem: unknown field"),
        ({"userId": "u1", "scenario": "home", "context": {"itemIds": [3]}}, "context.item_ids: "),
        (
            {"userId": "u1", "scenario": "home", "history": [{"itemId": "i1", "type": "NOPE"}]},
            "history[0].type: ",
        ),
        ([1, 2], "request: must be a JSON object"),
    ],
)
async def test_bad_input_is_400_naming_the_field(client: httpx.AsyncClient, body, field: str):
    response = await client.post("/v1/recommend", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["message"].startswith(field), error


async def test_bad_event_and_bad_json_are_400(client: httpx.AsyncClient):
    event = {"eventId": "e1", "userId": "u1", "itemId": "i1", "type": "EVENT_TYPE_UNSPECIFIED"}
    response = await client.post("/v1/events", json={"events": [event]}, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("events[0].type: must be one of")
    response = await client.post("/v1/events", content=b"{not json", headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("request: not valid JSON")


async def test_no_or_a_wrong_token_is_401_before_the_body_is_read(client: httpx.AsyncClient):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TEST_TOKEN}"}):
        response = await client.post(
            "/v1/recommend", json={"userId": "u1", "scenario": "home", "numItems": 5}, headers=headers
        )
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "UNAUTHENTICATED"
        assert response.headers["www-authenticate"] == "Bearer"
    # refused before parsing, as on gRPC: garbage without a token is 401, not 400
    assert (await client.post("/v1/events", content=b"\xff\xfe")).status_code == 401
    assert (await client.get("/v1/scenarios")).status_code == 401


@pytest.fixture
async def scoped_gateway(tmp_path: Path) -> AsyncIterator[GatewayServer]:
    """A gateway accepting TEST_TOKEN (every scope) and RECOMMEND_ONLY (scope recommend)."""
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    folder = tmp_path / "scoped"
    folder.mkdir()
    tokens = tokens_file(folder, ("recommend-only", RECOMMEND_ONLY, ("recommend",)))
    config = gateway_config(tmp_path, recall.address, rank.address, auth_tokens_file=tokens)
    gateway = await serve(config, new_registry(False))
    try:
        yield gateway
    finally:
        await gateway.stop(0)
        await recall.stop()
        await rank.stop()


async def test_a_token_without_the_scope_is_403(scoped_gateway: GatewayServer):
    headers = {"Authorization": f"Bearer {RECOMMEND_ONLY}"}
    async with httpx.AsyncClient(base_url=base_url(scoped_gateway), timeout=10) as http:
        ok = await http.post(
            "/v1/recommend", json={"userId": "u1", "scenario": "home", "numItems": 5}, headers=headers
        )
        assert ok.status_code == 200
        debug = await http.post(
            "/v1/recommend",
            json={"userId": "u1", "scenario": "home", "numItems": 5, "debug": True},
            headers=headers,
        )
        assert debug.status_code == 403
        assert debug.json()["error"] == {
            "code": "PERMISSION_DENIED",
            "message": "this request needs scope 'debug'; token 'recommend-only' lacks it",
        }
        event = {"eventId": "e1", "userId": "u1", "itemId": "i1", "type": "CLICK"}
        events = await http.post("/v1/events", json={"events": [event]}, headers=headers)
        assert events.status_code == 403
        assert (
            events.json()["error"]["message"]
            == "LogEvents needs scope 'events'; token 'recommend-only' lacks it"
        )


async def test_a_downstream_failure_is_still_200_degraded(client: httpx.AsyncClient, fake_stack: FakeStack):
    fake_stack.fake_rank.behaviour.fail_with = grpc.StatusCode.UNAVAILABLE
    response = await client.post(
        "/v1/recommend",
        json={"userId": "u1", "scenario": "category", "numItems": 5, "context": {"category": "c2"}},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] is True and body["degradedReasons"] == ["rank_unavailable"]
    assert body["items"]


async def test_no_downstream_and_no_fallback_is_503(tmp_path: Path):
    # nothing listens on these: no catalog, so nothing to fall back to
    config = gateway_config(tmp_path, "127.0.0.1:1", "127.0.0.1:2")
    gateway = await serve(config, new_registry(False))
    try:
        async with httpx.AsyncClient(base_url=base_url(gateway), timeout=10) as http:
            response = await http.post(
                "/v1/recommend", json={"userId": "u1", "scenario": "home", "numItems": 5}, headers=AUTH
            )
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "UNAVAILABLE"
            items = await http.get("/v1/items", params={"ids": "i1"}, headers=AUTH)
            assert items.status_code == 503
    finally:
        await gateway.stop(0)


async def test_the_deadline_header_reaches_downstreams(client: httpx.AsyncClient, fake_stack: FakeStack):
    body = {"userId": "u1", "scenario": "home", "numItems": 5}
    response = await client.post("/v1/recommend", json=body, headers={**AUTH, "X-Timeout-Ms": "200"})
    assert response.status_code == 200
    recall_deadline = fake_stack.fake_recall.behaviour.time_remaining[-1]
    # home: recall 120 ms and rank 150 ms of a 200 ms caller deadline -> recall gets its share
    assert recall_deadline is not None and recall_deadline <= 0.2 * 120 / 270 + 0.01
    for bad in ("soon", "0", "-5", "nan"):
        refused = await client.post("/v1/recommend", json=body, headers={**AUTH, "X-Timeout-Ms": bad})
        assert refused.status_code == 400, bad
        assert refused.json()["error"]["message"].startswith("X-Timeout-Ms: must be a positive number")


async def test_overload_is_429(client: httpx.AsyncClient, fake_stack: FakeStack):
    servicer = fake_stack.gateway.servicer
    servicer.in_flight = servicer.max_in_flight  # as if that many calls were being served
    try:
        shed = await client.post(
            "/v1/recommend", json={"userId": "u1", "scenario": "home", "numItems": 5}, headers=AUTH
        )
    finally:
        servicer.in_flight = 0
    assert shed.status_code == 429
    assert shed.json()["error"]["code"] == "RESOURCE_EXHAUSTED"


async def test_the_handler_deadline_is_504(client: httpx.AsyncClient, fake_stack: FakeStack):
    blocked = asyncio.Event()
    store = fake_stack.gateway.servicer.history_store
    append = store.append

    async def slow_append(events):
        await blocked.wait()
        return await append(events)

    store.append = slow_append  # the history store hangs: nothing in LogEvents bounds it but the caller
    try:
        event = {"eventId": "slow-1", "userId": "u1", "itemId": "i1", "type": "CLICK"}
        response = await client.post(
            "/v1/events", json={"events": [event]}, headers={**AUTH, "X-Timeout-Ms": "100"}
        )
        assert response.status_code == 504, response.text
        assert response.json()["error"] == {"code": "DEADLINE_EXCEEDED", "message": "deadline exceeded"}
    finally:
        blocked.set()
        store.append = append


async def test_scenarios_items_health_and_readiness(client: httpx.AsyncClient, fake_stack: FakeStack):
    response = await client.get("/v1/scenarios", headers=AUTH)
    assert response.status_code == 200
    scenarios = {s["name"]: s for s in response.json()["scenarios"]}
    assert set(scenarios) == set(fake_stack.gateway.scenarios.current.scenarios)
    assert scenarios["item_detail"]["requiredFields"] == ["context.itemIds", "userId"]
    assert scenarios["home"]["requiredFields"] == ["userId"]
    assert scenarios["home"]["defaultNumItems"] == 20

    items = await client.get("/v1/items", params={"ids": "i7,nope"}, headers=AUTH)
    assert items.json()["items"] == [
        {"itemId": "i7", "known": True, "category": "c2", "brand": "b0"},
        {"itemId": "nope", "known": False},
    ]

    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "SERVING"}
    await fake_stack.gateway.running.set_serving(False)
    not_ready = await client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json() == {"status": "NOT_SERVING"}
    await fake_stack.gateway.running.set_serving(True)


async def test_unknown_routes_and_methods_are_json_errors(client: httpx.AsyncClient):
    missing = await client.get("/v1/nope", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"
    wrong_method = await client.get("/v1/recommend", headers=AUTH)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "UNIMPLEMENTED"


async def test_openapi_is_generated_from_the_protos(client: httpx.AsyncClient):
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert set(document["paths"]) >= {"/v1/recommend", "/v1/events", "/v1/scenarios", "/healthz", "/readyz"}
    schemas = document["components"]["schemas"]
    assert set(schemas["RecommendRequest"]["properties"]) == {
        "requestId",
        "userId",
        "scenario",
        "numItems",
        "context",
        "debug",
        "history",
    }
    assert schemas["EventType"]["enum"][:2] == ["EVENT_TYPE_UNSPECIFIED", "VIEW"]
    assert schemas["Event"]["properties"]["timestampMs"]["format"] == "int64"
    recommend = document["paths"]["/v1/recommend"]["post"]
    assert set(recommend["responses"]) >= {"200", "400", "401", "403", "429", "503", "504"}


async def test_console_is_served_from_the_package(client: httpx.AsyncClient, fake_stack: FakeStack):
    page = await client.get("/console")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/console/console.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    script = await client.get("/console/console.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert (await client.get("/console/nope.js")).status_code == 404
    config = await client.get("/console/config.json")
    assert config.json() == {"metricsPort": fake_stack.gateway.metrics_port}


async def test_http_requests_are_counted(client: httpx.AsyncClient, fake_stack: FakeStack):
    await client.post("/v1/recommend", json={"userId": "u1", "scenario": "home", "numItems": 5}, headers=AUTH)
    await client.post("/v1/recommend", json={"scenario": "home", "numItems": 5}, headers=AUTH)
    await client.get("/nowhere")
    text = generate_latest(fake_stack.gateway.registry).decode()
    assert 'recsys_http_requests_total{code="200",method="POST",route="/v1/recommend"} 1.0' in text
    assert 'recsys_http_requests_total{code="400",method="POST",route="/v1/recommend"} 1.0' in text
    assert 'recsys_http_requests_total{code="404",method="GET",route="other"} 1.0' in text
    # and, like a gRPC call, in the servicer's own metrics
    assert 'recsys_requests_total{outcome="ok",scenario="home"} 1.0' in text
    assert 'recsys_requests_total{outcome="invalid",scenario="home"} 1.0' in text


@pytest.mark.parametrize("fake_stack", [{"http_enabled": False}], indirect=True)
async def test_http_can_be_turned_off(fake_stack: FakeStack):
    assert fake_stack.gateway.http_port is None


async def test_https_with_the_grpc_ports_certificate(tmp_path: Path, fake_stack: FakeStack):
    """With TLS configured, the HTTP port speaks HTTPS with the same certificate (tokens never
    travel in plaintext)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to generate test certificates")
    _make_ca("test-ca", tmp_path)
    _make_leaf("server", "test-ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", tmp_path)
    serving = dataclasses.replace(
        fake_stack.gateway.config, tls_cert=tmp_path / "server.crt", tls_key=tmp_path / "server.key"
    )
    config = gateway_config(tmp_path, fake_stack.recall.address, fake_stack.rank.address, serving=serving)
    gateway = await serve(config, new_registry(False))
    try:
        trust = ssl.create_default_context(cafile=str(tmp_path / "test-ca.crt"))
        async with httpx.AsyncClient(verify=trust, timeout=10) as https:
            response = await https.get(f"https://127.0.0.1:{gateway.http_port}/healthz")
            assert response.status_code == 200
        async with httpx.AsyncClient(timeout=10) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{gateway.http_port}/healthz")
    finally:
        await gateway.stop(0)


def test_http_settings_from_flags_and_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    monkeypatch.setenv("RECSYS_ALLOW_UNAUTHENTICATED", "1")
    for name in ("RECSYS_HTTP", "RECSYS_HTTP_PORT"):
        monkeypatch.delenv(name, raising=False)
    config = GatewayConfig.from_args([])
    assert (config.http_enabled, config.http_port) == (True, DEFAULT_HTTP_PORT)
    assert GatewayConfig.from_args(["--http-port", "0"]).http_port == 0
    assert not GatewayConfig.from_args(["--no-http"]).http_enabled
    monkeypatch.setenv("RECSYS_HTTP_PORT", "8181")
    monkeypatch.setenv("RECSYS_HTTP", "0")
    config = GatewayConfig.from_args([])
    assert (config.http_enabled, config.http_port) == (False, 8181)
    assert GatewayConfig.from_args(["--http"]).http_enabled  # the flag wins
    for argv, message in (
        (["--http-port", "70000"], "http_port: must be an integer in 0..65535"),
        (["--http-port", "9090", "--http"], "http_port: must differ from port and metrics_port"),
    ):
        with pytest.raises(SystemExit):
            GatewayConfig.from_args(argv)
        assert message in capsys.readouterr().err
