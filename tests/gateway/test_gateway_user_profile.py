"""GetUserProfile: the history part (event-type and recency weights, shares summing to 1, unknown
items skipped and counted, the stateless history instead of the stored one), the nearest
attribute clusters from recall, validation naming the field, the `recommend` scope, a recall
failure served as a degraded profile, HTTP/JSON, the typed client and the console page; against
the real gateway over fake downstreams, and once over the real recall and rank servers."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from gateway.http_api import CONSOLE_DIR, openapi_document
from gateway.profile import DAY_MS, EVENT_TYPE_WEIGHTS, HALF_LIFE_MS
from gateway.server import GATEWAY_ACCESS, serve
from recsys.client import AsyncRecsysClient, HistoryEntry, InvalidArgumentError, RecsysClient
from recsys.serving.metrics import new_registry
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import TEST_TOKEN, FakeStack, gateway_channel, gateway_config, tokens_file
from tests.gateway.fakes import BRANDS, CATEGORIES, FakeRank, FakeRecall, FakeServer

pytestmark = pytest.mark.integration

NOW_MS = 1_700_000_000_000
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


def item(
    index: int, event_type: int = common_pb2.VIEW, days_ago: float | None = 0.0
) -> common_pb2.HistoryItem:
    """Item ``i<index>`` (category c<index % 5>, brand b<index % 7>) ``days_ago`` before NOW_MS
    (None: no timestamp)."""
    timestamp = 0 if days_ago is None else int(NOW_MS - days_ago * DAY_MS)
    return common_pb2.HistoryItem(item_id=f"i{index}", type=event_type, timestamp_ms=timestamp)


def profile_request(*history: common_pb2.HistoryItem, **fields) -> gateway_pb2.GetUserProfileRequest:
    return gateway_pb2.GetUserProfileRequest(history=list(history), **fields)


def weights(entries) -> dict[str, float]:
    return {entry.name: entry.weight for entry in entries}


@pytest.fixture
def stack(fake_stack: FakeStack) -> FakeStack:
    """The fake stack with the gateway's clock at NOW_MS."""
    fake_stack.gateway.servicer.clock_ms = lambda: NOW_MS
    return fake_stack


async def test_weights_are_shares_ordered_by_event_type_and_recency(stack: FakeStack):
    # Weights (documented in gateway/profile.py): view 1, click 2, add_to_cart 4, purchase 8,
    # times 0.5 ** (age / 30 days).
    assert [EVENT_TYPE_WEIGHTS[t] for t in (common_pb2.VIEW, common_pb2.CLICK)] == [1.0, 2.0]
    assert [EVENT_TYPE_WEIGHTS[t] for t in (common_pb2.ADD_TO_CART, common_pb2.PURCHASE)] == [4.0, 8.0]
    assert HALF_LIFE_MS == 30 * DAY_MS
    response = await stack.stub.GetUserProfile(
        profile_request(
            item(0, common_pb2.PURCHASE, days_ago=60),  # c0 b0: 8 * 0.25 = 2
            item(1, common_pb2.VIEW, days_ago=0),  # c1 b1: 1
            item(2, common_pb2.CLICK, days_ago=30),  # c2 b2: 2 * 0.5 = 1
            item(7, common_pb2.VIEW, days_ago=30),  # c2 b0: 0.5
            user_id="u1",
        ),
        timeout=5,
    )
    categories = weights(response.categories)
    assert list(categories) == ["c0", "c2", "c1"]  # heaviest first
    assert categories == pytest.approx({"c0": 2 / 4.5, "c2": 1.5 / 4.5, "c1": 1 / 4.5})
    assert math.isclose(sum(categories.values()), 1.0, rel_tol=1e-9)
    brands = weights(response.brands)
    assert list(brands) == ["b0", "b1", "b2"]  # b1 and b2 tie (1 event each): the catalog's order
    assert brands == pytest.approx({"b0": 2.5 / 4.5, "b1": 1 / 4.5, "b2": 1 / 4.5})
    c2 = response.categories[1]
    assert (c2.events, c2.last_seen_ms) == (2, NOW_MS - 30 * DAY_MS)
    assert (response.history_length, response.unknown_items) == (4, 0)
    assert response.user_id == "u1" and not response.degraded


async def test_an_old_purchase_against_a_recent_view_follows_the_half_life(stack: FakeStack):
    async def shares(*history: common_pb2.HistoryItem) -> dict[str, float]:
        return weights((await stack.stub.GetUserProfile(profile_request(*history), timeout=5)).categories)

    # 8 * 0.5 ** 3 = 1: a purchase three half-lives old weighs what a view today does
    assert await shares(item(0, common_pb2.PURCHASE, 90), item(1)) == pytest.approx({"c0": 0.5, "c1": 0.5})
    assert await shares(item(0, common_pb2.PURCHASE, 60), item(1)) == pytest.approx(
        {"c0": 2 / 3, "c1": 1 / 3}
    )
    assert await shares(item(0, common_pb2.PURCHASE, 120), item(1)) == pytest.approx(
        {"c1": 2 / 3, "c0": 1 / 3}
    )
    # at the same time, the intent orders them: purchase > add_to_cart > click > view
    same_time = await shares(
        item(0, common_pb2.VIEW),
        item(1, common_pb2.CLICK),
        item(2, common_pb2.ADD_TO_CART),
        item(3, common_pb2.PURCHASE),
    )
    assert list(same_time) == ["c3", "c2", "c1", "c0"]
    assert same_time == pytest.approx({"c3": 8 / 15, "c2": 4 / 15, "c1": 2 / 15, "c0": 1 / 15})
    # no timestamp counts as now; decades-old events alone still get their shares
    assert await shares(item(0, days_ago=None), item(1, days_ago=30)) == pytest.approx(
        {"c0": 2 / 3, "c1": 1 / 3}
    )
    ancient = await shares(item(0, days_ago=19_000), item(1, common_pb2.CLICK, days_ago=19_000))
    assert ancient == pytest.approx({"c1": 2 / 3, "c0": 1 / 3})


async def test_unknown_items_are_skipped_and_counted(stack: FakeStack):
    history = [item(1), common_pb2.HistoryItem(item_id="not-in-catalog"), item(2)]
    response = await stack.stub.GetUserProfile(profile_request(*history, user_id="u1"), timeout=5)
    assert (response.history_length, response.unknown_items) == (3, 1)
    assert weights(response.categories) == pytest.approx({"c1": 0.5, "c2": 0.5})
    sent = stack.fake_recall.profile_behaviour.requests[-1]
    assert np.frombuffer(sent.history_items, "<i4").tolist() == [1, 2]  # only known items reach recall
    unknown = stack.gateway.registry.get_sample_value("recsys_unknown_items_total")
    assert unknown is not None and unknown >= 1
    only_unknown = await stack.stub.GetUserProfile(
        profile_request(common_pb2.HistoryItem(item_id="nope")), timeout=5
    )
    assert (only_unknown.unknown_items, list(only_unknown.categories), list(only_unknown.nearest)) == (
        1,
        [],
        [],
    )
    assert stack.fake_recall.profile_behaviour.calls == 1  # nothing to embed: recall not asked


async def test_the_stored_history_and_a_stateless_history_instead(stack: FakeStack):
    now = int(time.time() * 1000)
    stack.gateway.servicer.clock_ms = lambda: now
    events = [
        gateway_pb2.Event(
            event_id=f"e{i}", user_id="u7", item_id=f"i{index}", type=event_type, timestamp_ms=now
        )
        for i, (index, event_type) in enumerate(
            [(3, common_pb2.VIEW), (8, common_pb2.PURCHASE), (4, common_pb2.VIEW)]
        )
    ]
    await stack.stub.LogEvents(gateway_pb2.LogEventsRequest(events=events), timeout=5)
    stored = await stack.stub.GetUserProfile(gateway_pb2.GetUserProfileRequest(user_id="u7"), timeout=5)
    assert weights(stored.categories) == pytest.approx({"c3": 9 / 10, "c4": 1 / 10})
    assert stored.history_length == 3 and stored.categories[0].last_seen_ms == now
    sent = stack.fake_recall.profile_behaviour.requests[-1]
    assert np.frombuffer(sent.history_items, "<i4").tolist() == [3, 8, 4]
    assert np.frombuffer(sent.history_types, "u1").tolist() == [1, 4, 1]
    # nearest: the fake puts the newest item's category and brand first (i4: c4, b4)
    assert [(n.kind, n.name) for n in stored.nearest][:1] == [("category", "c4")]
    assert next((n.kind, n.name) for n in stored.nearest if n.kind == "brand") == ("brand", "b4")
    assert stored.model_version == "recall=fake-recall-1"

    stateless = await stack.stub.GetUserProfile(profile_request(item(6), user_id="u7"), timeout=5)
    assert weights(stateless.categories) == {"c1": 1.0} and stateless.history_length == 1
    assert np.frombuffer(stack.fake_recall.profile_behaviour.requests[-1].history_items, "<i4").tolist() == [
        6
    ]
    anonymous = await stack.stub.GetUserProfile(profile_request(item(6)), timeout=5)  # no user id
    assert weights(anonymous.categories) == {"c1": 1.0} and anonymous.user_id == ""
    nobody = await stack.stub.GetUserProfile(gateway_pb2.GetUserProfileRequest(user_id="u-new"), timeout=5)
    assert (nobody.history_length, list(nobody.categories), list(nobody.nearest), nobody.degraded) == (
        0,
        [],
        [],
        False,
    )


async def test_top_n_bounds_every_list(stack: FakeStack):
    history = [item(index) for index in range(10)]
    default = await stack.stub.GetUserProfile(profile_request(*history), timeout=5)
    assert len(default.categories) == len(CATEGORIES) and len(default.brands) == len(BRANDS)
    assert stack.fake_recall.profile_behaviour.requests[-1].top_n == 10  # 0 = 10
    assert [n.kind for n in default.nearest] == ["category"] * len(CATEGORIES) + ["brand"] * len(BRANDS)
    assert sum(entry.weight for entry in default.brands) == pytest.approx(1.0)
    two = await stack.stub.GetUserProfile(profile_request(*history, top_n=2), timeout=5)
    assert len(two.categories) == 2 and len(two.brands) == 2
    assert [(n.kind, n.name, round(n.similarity, 3)) for n in two.nearest] == [
        ("category", "c4", 1.0),  # the newest item, i9
        ("category", "c0", 0.9),
        ("brand", "b2", 1.0),
        ("brand", "b0", 0.9),
    ]
    assert sum(entry.weight for entry in two.categories) < 1.0  # the shares of all entries sum to 1


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "user_id"),
        ({"user_id": "has space"}, "user_id"),
        ({"user_id": "x" * 257}, "user_id"),
        ({"user_id": "u1", "top_n": -1}, "top_n"),
        ({"user_id": "u1", "top_n": 101}, "top_n"),
        ({"history": [common_pb2.HistoryItem(item_id="")]}, "history[0].item_id"),
        ({"history": [item(1), common_pb2.HistoryItem(item_id="i2", type=9)]}, "history[1].type"),
        ({"history": [common_pb2.HistoryItem(item_id="i2", timestamp_ms=-1)]}, "history[0].timestamp_ms"),
        ({"history": [item(1)] * 1001}, "history"),
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field(stack: FakeStack, fields: dict, field: str):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.GetUserProfile(gateway_pb2.GetUserProfileRequest(**fields), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"{field}: ")
    assert stack.fake_recall.profile_behaviour.calls == 0


async def test_recall_down_serves_the_history_part_marked_degraded(stack: FakeStack):
    history = [item(1, common_pb2.PURCHASE), item(2)]
    stack.fake_recall.profile_behaviour.fail_with = grpc.StatusCode.INTERNAL
    failing = await stack.stub.GetUserProfile(profile_request(*history, user_id="u1"), timeout=5)
    assert failing.degraded and list(failing.degraded_reasons) == ["recall_internal"]
    assert list(failing.nearest) == [] and weights(failing.categories) == pytest.approx(
        {"c1": 8 / 9, "c2": 1 / 9}
    )
    assert failing.model_version == "recall=fake-recall-1"  # the catalog's, which weighed the history

    await stack.recall.stop()
    down = await stack.stub.GetUserProfile(profile_request(*history, user_id="u1"), timeout=5)
    assert down.degraded and list(down.degraded_reasons) == ["recall_unavailable"]
    assert weights(down.categories) == weights(failing.categories) and list(down.nearest) == []


async def test_recall_on_another_catalog_is_degraded_and_refetched(stack: FakeStack):
    catalog_calls = stack.fake_recall.catalog_calls
    stack.fake_recall.catalog = "another-catalog"
    response = await stack.stub.GetUserProfile(profile_request(item(1)), timeout=5)
    assert list(response.degraded_reasons) == ["recall_catalog_mismatch"] and list(response.nearest) == []
    assert weights(response.categories) == {"c1": 1.0}
    for _ in range(100):  # the refetch runs in the background
        if stack.fake_recall.catalog_calls > catalog_calls:
            break
        await asyncio.sleep(0.02)
    assert stack.fake_recall.catalog_calls > catalog_calls


@pytest.mark.parametrize("fake_stack", [{"default_deadline_ms": 300}], indirect=True)
async def test_recall_slower_than_the_deadline_is_degraded_not_failed(stack: FakeStack):
    stack.fake_recall.profile_behaviour.delay_s = 5.0
    # no client deadline: the gateway's default (300 ms here) bounds the recall call
    response = await stack.stub.GetUserProfile(profile_request(item(1)))
    assert list(response.degraded_reasons) == ["recall_deadline_exceeded"]
    assert weights(response.categories) == {"c1": 1.0}
    carried = stack.fake_recall.profile_behaviour.time_remaining[-1]
    assert carried is not None and carried <= 0.3


async def test_reading_a_profile_needs_the_recommend_scope(tmp_path: Path):
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    scoped = tmp_path / "scoped"
    scoped.mkdir()
    tokens = tokens_file(
        scoped,
        ("recommend-only", "recommend-token", ("recommend",)),
        ("events-only", "events-token", ("events",)),
        ("admin-only", "admin-token", ("admin",)),
    )
    gateway = await serve(
        gateway_config(tmp_path, recall.address, rank.address, auth_tokens_file=tokens), new_registry(False)
    )
    request = profile_request(item(1), user_id="u1")
    try:
        for token in ("events-token", "admin-token"):
            async with gateway_channel(gateway.address, token=token) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await gateway_pb2_grpc.GatewayStub(channel).GetUserProfile(request, timeout=5)
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "GetUserProfile needs scope 'recommend'" in caught.value.details()
        async with gateway_channel(gateway.address, token=None) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway_pb2_grpc.GatewayStub(channel).GetUserProfile(request, timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with gateway_channel(gateway.address, token="recommend-token") as channel:
            answer = await gateway_pb2_grpc.GatewayStub(channel).GetUserProfile(request, timeout=5)
            assert weights(answer.categories) == {"c1": 1.0}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http_port}", timeout=10) as http:
            refused = await http.post(
                "/v1/user-profile", json={"userId": "u1"}, headers={"Authorization": "Bearer events-token"}
            )
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "PERMISSION_DENIED"
    finally:
        await gateway.stop(0)
        await recall.stop()
        await rank.stop()


def test_every_gateway_method_has_a_scope():
    """The access policy fails closed for a method it does not list; every method must be listed
    (GetUserProfile reads the user's data: `recommend`, like Recommend)."""
    service = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    listed = {method.rpartition("/")[2] for method in GATEWAY_ACCESS.method_scopes}
    assert listed == {method.name for method in service.methods}
    assert GATEWAY_ACCESS.method_scopes[f"/{service.full_name}/GetUserProfile"] == "recommend"


@pytest.fixture
async def http(stack: FakeStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.gateway.http_port}", timeout=10
    ) as client:
        yield client


async def test_http_json_route_and_openapi(http: httpx.AsyncClient):
    body = {
        "userId": "u1",
        "history": [{"itemId": "i0", "type": "PURCHASE", "timestampMs": str(NOW_MS)}, {"itemId": "i1"}],
        "topN": 3,
    }
    response = await http.post("/v1/user-profile", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [entry["name"] for entry in answer["categories"]] == ["c0", "c1"]
    assert answer["categories"][0] == {
        "name": "c0",
        "weight": pytest.approx(8 / 9),
        "events": 1,
        "lastSeenMs": str(NOW_MS),
    }
    assert answer["nearest"][0] == {"kind": "category", "name": "c1", "similarity": 1.0}
    assert answer["degraded"] is False and answer["historyLength"] == 2
    bad = await http.post("/v1/user-profile", json={"userId": "u1", "topN": 500}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("top_n: ")
    document = openapi_document()
    operation = document["paths"]["/v1/user-profile"]["post"]
    assert operation["operationId"] == "GetUserProfile"
    schemas = document["components"]["schemas"]
    assert set(schemas["GetUserProfileRequest"]["properties"]) == {"userId", "history", "topN"}
    assert {"categories", "brands", "nearest", "degraded"} <= set(
        schemas["GetUserProfileResponse"]["properties"]
    )
    assert set(schemas["ProfileEntry"]["properties"]) == {"name", "weight", "events", "lastSeenMs"}


async def test_typed_clients(stack: FakeStack):
    async with AsyncRecsysClient(stack.gateway.address, token=TEST_TOKEN) as client:
        profile = await client.user_profile(history=["i2", HistoryEntry("i3", type="purchase")], top_n=2)
        assert [entry.name for entry in profile.categories] == ["c3", "c2"]
        assert profile.categories[0].weight == pytest.approx(8 / 9) and profile.categories[0].events == 1
        assert profile.nearest[0].kind == "category" and profile.nearest[0].name == "c3"
        assert profile.history_length == 2 and not profile.degraded and profile.degraded_reasons == ()
        with pytest.raises(InvalidArgumentError) as caught:
            await client.user_profile("u1", top_n=101)
        assert caught.value.field == "top_n"
    address = stack.gateway.address

    def blocking() -> None:
        with RecsysClient(address, token=TEST_TOKEN) as client:
            profile = client.user_profile("u1", history=["i4"])
            assert [entry.name for entry in profile.brands] == ["b4"]
            assert profile.model_version == "recall=fake-recall-1"

    await asyncio.to_thread(blocking)


def test_the_console_page_has_the_profile_panel():
    page = (CONSOLE_DIR / "index.html").read_text(encoding="utf-8")
    for element in ('id="profile"', 'id="profile-categories"', 'id="profile-brands"', 'id="profile-nearest"'):
        assert element in page
    script = (CONSOLE_DIR / "console.js").read_text(encoding="utf-8")
    assert '"/v1/user-profile"' in script and "renderProfile(" in script


async def test_the_real_recall_server_answers_the_nearest_attributes(
    recall_bundle: Path, rank_bundle: Path, synthetic_dataset, tmp_path: Path
):
    """Over the real recall server (tiny bundle): nearest categories and brands of the catalog,
    by similarity, top_n of each; recall stopped -> the history part, degraded."""
    from tests.stack import running_stack

    dataset = synthetic_dataset
    async with running_stack(recall_bundle, rank_bundle, tmp_path) as stack:
        catalog = stack.gateway.servicer.pipeline.catalog
        assert catalog is not None
        user_history = dataset.items.external_many(dataset.sequences[0][:8])
        request = gateway_pb2.GetUserProfileRequest(
            history=[common_pb2.HistoryItem(item_id=item_id) for item_id in user_history], top_n=3
        )
        async with stack.gateway_channel() as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            response = await stub.GetUserProfile(request, timeout=10)
            assert not response.degraded and response.model_version == f"recall={catalog.version}"
            kinds = [n.kind for n in response.nearest]
            assert kinds == ["category"] * 3 + ["brand"] * 3
            for kind, names in (("category", catalog.category_names), ("brand", catalog.brand_names)):
                nearest = [n for n in response.nearest if n.kind == kind]
                assert all(n.name in names and -1.0 <= n.similarity <= 1.0 + 1e-6 for n in nearest)
                similarities = [n.similarity for n in nearest]
                assert similarities == sorted(similarities, reverse=True)
            expected = {
                catalog.category_names[category]
                for category in catalog.item_category[catalog.indices(user_history)].tolist()
                if category >= 0
            }
            assert {entry.name for entry in response.categories} <= expected
            assert sum(entry.weight for entry in response.categories) <= 1.0 + 1e-9

            await stack.stop_recall()
            degraded = await stub.GetUserProfile(request, timeout=10)
            assert degraded.degraded and degraded.degraded_reasons[0].startswith("recall_")
            assert list(degraded.nearest) == [] and list(degraded.categories) == list(response.categories)


async def test_gateway_without_a_catalog_is_unavailable(stack: FakeStack):
    """No catalog held (recall never answered): item ids mean nothing yet -> UNAVAILABLE, like
    Recommend, and a catalog refetch is started."""
    stack.fake_recall.behaviour.fail_with = grpc.StatusCode.UNAVAILABLE  # the refetch fails too
    stack.gateway.servicer.pipeline.catalog = None
    calls = stack.fake_recall.catalog_calls
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.stub.GetUserProfile(profile_request(item(1)), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "catalog" in caught.value.details()
    for _ in range(100):
        if stack.fake_recall.catalog_calls > calls:
            break
        await asyncio.sleep(0.02)
    assert stack.fake_recall.catalog_calls > calls


async def test_the_console_shows_the_current_users_profile(stack: FakeStack):
    """In headless Chromium (as tests/gateway/test_gateway_console.py): after a recommendation for
    a user with a stored history, the profile panel lists their categories, brands and nearest
    clusters."""
    pytest.importorskip("playwright.async_api", reason="playwright (the dev extra) is not installed")
    from playwright.async_api import async_playwright

    from tests.gateway.test_gateway_console import chromium

    browser_path = chromium()
    now = int(time.time() * 1000)
    stack.gateway.servicer.clock_ms = lambda: now
    events = [
        gateway_pb2.Event(
            event_id=f"c{i}", user_id="u5", item_id=f"i{index}", type=common_pb2.PURCHASE, timestamp_ms=now
        )
        for i, index in enumerate((3, 8, 13, 1))
    ]
    await stack.stub.LogEvents(gateway_pb2.LogEventsRequest(events=events), timeout=5)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            base = f"http://127.0.0.1:{stack.gateway.http_port}"
            await page.goto(f"{base}/console#token={TEST_TOKEN}&scenario=home&user=u5&n=5")
            await page.wait_for_selector("#profile-categories tr[data-name]", timeout=10_000)
            names = await page.locator("#profile-categories tr[data-name]").evaluate_all(
                "(rows) => rows.map((row) => row.dataset.name)"
            )
            assert names == ["c3", "c1"]  # 3 purchases in c3, 1 in c1
            assert "0.750" in await page.locator("#profile-categories").inner_text()
            assert await page.locator("#profile-brands tr[data-name]").count() == 3  # b3, b1, b6
            nearest = page.locator('#profile-nearest tr[data-kind="category"]')
            assert await nearest.count() == len(CATEGORIES)  # top 5
            assert (await nearest.first.get_attribute("data-name")) == "category c1"  # newest: i1
            assert "4 events" in await page.locator("#profile-status").inner_text()
            assert errors == []
        finally:
            await browser.close()
