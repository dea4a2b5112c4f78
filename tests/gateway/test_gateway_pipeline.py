"""The real gateway server in front of fake recall/rank servers: every scenario of the shipped
config, events, fallbacks, deadlines, load shedding, validation, metrics and config reload."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from gateway.config import DEFAULT_SCENARIOS
from gateway.server import serve
from recsys.serving.metrics import new_registry
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, rank_pb2_grpc, recall_pb2_grpc
from tests.gateway.conftest import FakeStack, gateway_channel, gateway_config
from tests.gateway.fakes import (
    CATALOG,
    FakeRank,
    FakeRecall,
    FakeServer,
    bid_of,
    candidates_of,
    category_of,
    history_of,
    item_index,
)

NOW_MS = int(time.time() * 1000)


def recommend(
    scenario: str, user: str = "u1", n: int = 20, items=(), category: str = "", debug=False, history=None
) -> gateway_pb2.RecommendRequest:
    return gateway_pb2.RecommendRequest(
        request_id="r1",
        user_id=user,
        scenario=scenario,
        num_items=n,
        debug=debug,
        context=gateway_pb2.RecommendContext(item_ids=list(items), category=category),
        history=history or [],
    )


def event(event_id: str, item_id: str, event_type=common_pb2.VIEW, user: str = "u1", ts: int = NOW_MS):
    return gateway_pb2.Event(
        event_id=event_id, user_id=user, item_id=item_id, type=event_type, timestamp_ms=ts
    )


def ids(response: gateway_pb2.RecommendResponse) -> list[str]:
    return [item.item_id for item in response.items]


def seeds_of(request) -> list[str]:
    return [f"i{index}" for index in np.frombuffer(request.seed_items, "<i4").tolist()]


def history_ids(request) -> list[str]:
    return [f"i{index}" for index in history_of(request)]


async def test_every_shipped_scenario_serves_items_that_obey_its_rules(fake_stack: FakeStack):
    stub = fake_stack.stub
    await stub.LogEvents(
        gateway_pb2.LogEventsRequest(
            events=[
                event("e1", "i10"),
                event("e2", "i11", common_pb2.PURCHASE),
                event("e3", "i12", common_pb2.CLICK),
            ]
        )
    )

    home = await stub.Recommend(recommend("home", n=20))
    assert len(home.items) == 20 and not home.degraded
    assert not {"i10", "i11", "i12"} & set(ids(home))  # history excluded by recall, purchase dropped
    categories = Counter(category_of(item_index(i)) for i in ids(home))
    brands = Counter(str(item_index(i) % 7) for i in ids(home))
    assert max(categories.values()) <= 4 and max(brands.values()) <= 3
    assert home.model_version == "rank=fake-rank-1,recall=fake-recall-1"
    assert {t.stage for t in home.timings} == {"history", "recall", "rank", "rerank", "total"}

    detail = await stub.Recommend(recommend("item_detail", items=["i42"]))
    assert detail.items and "i42" not in ids(detail)
    recall_request = fake_stack.fake_recall.behaviour.requests[-1]
    assert seeds_of(recall_request) == ["i42"]
    assert {q.source for q in recall_request.sources} == {"i2i", "covisit", "u2i"}

    category = await stub.Recommend(recommend("category", category="c3"))
    assert category.items and {category_of(item_index(i)) for i in ids(category)} == {"c3"}

    ads = await stub.Recommend(recommend("ads", n=10))
    assert len(ads.items) == 10
    assert all(bid_of(item_index(i)) >= 0.01 for i in ids(ads))
    revenues = [item.score for item in ads.items]
    assert revenues == sorted(revenues, reverse=True) and revenues[0] > 0

    cart = await stub.Recommend(recommend("cart", items=["i7"]))
    assert cart.items and "i7" not in ids(cart)


async def test_rank_orders_the_recall_candidates(fake_stack: FakeStack):
    response = await fake_stack.stub.Recommend(recommend("category", category="c1", n=10))
    scores = [item.score for item in response.items]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == max(float(item_index(i)) for i in ids(response))


async def test_a_cart_event_changes_the_next_cart_recommendation(fake_stack: FakeStack):
    stub = fake_stack.stub
    before = await stub.Recommend(recommend("cart", user="shopper"))
    empty_cart_request = fake_stack.fake_recall.behaviour.requests[-1]
    assert not seeds_of(empty_cart_request)
    assert {q.source for q in empty_cart_request.sources} == {"covisit", "u2i"}  # i2i needs seeds
    logged = await stub.LogEvents(
        gateway_pb2.LogEventsRequest(events=[event("c1", "i150", common_pb2.ADD_TO_CART, user="shopper")])
    )
    assert (logged.accepted, logged.duplicates) == (1, 0)
    after = await stub.Recommend(recommend("cart", user="shopper"))
    assert seeds_of(fake_stack.fake_recall.behaviour.requests[-1]) == ["i150"]
    assert "i2i" in {q.source for q in fake_stack.fake_recall.behaviour.requests[-1].sources}
    assert ids(after) != ids(before)
    assert "i150" not in ids(after)  # the cart item itself is not recommended

    again = await stub.LogEvents(
        gateway_pb2.LogEventsRequest(events=[event("c1", "i150", common_pb2.ADD_TO_CART, user="shopper")])
    )
    assert (again.accepted, again.duplicates) == (0, 1)


async def test_a_stateless_request_history_replaces_the_stored_one(fake_stack: FakeStack):
    stub = fake_stack.stub
    await stub.LogEvents(gateway_pb2.LogEventsRequest(events=[event("s1", "i5", user="stateless")]))
    history = [common_pb2.HistoryItem(item_id="i77", type=common_pb2.VIEW)]
    await stub.Recommend(recommend("home", user="stateless", history=history))
    assert history_ids(fake_stack.fake_recall.behaviour.requests[-1]) == ["i77"]
    assert history_ids(fake_stack.fake_rank.behaviour.requests[-1]) == ["i77"]


async def test_debug_explains_each_item(fake_stack: FakeStack):
    await fake_stack.stub.LogEvents(gateway_pb2.LogEventsRequest(events=[event("d1", "i20", user="dbg")]))
    response = await fake_stack.stub.Recommend(recommend("home", user="dbg", n=5, debug=True))
    for item in response.items:
        assert item.sources and item.source in item.sources
        assert item.rank_score == item.score and item.recall_score > 0
        assert list(item.attended_item_ids) == ["i20"]
        assert "recall:" in item.explanation and "rank score" in item.explanation
    plain = await fake_stack.stub.Recommend(recommend("home", user="dbg", n=5))
    assert all(not item.explanation and not item.sources for item in plain.items)


async def test_downstream_calls_carry_deadlines_split_from_the_callers(fake_stack: FakeStack):
    await fake_stack.stub.Recommend(recommend("home"), timeout=0.2)
    recall_deadline = fake_stack.fake_recall.behaviour.time_remaining[-1]
    rank_deadline = fake_stack.fake_rank.behaviour.time_remaining[-1]
    # home: recall 120 ms and rank 150 ms of a 200 ms caller deadline -> recall gets its share
    assert recall_deadline is not None and recall_deadline <= 0.2 * 120 / 270 + 0.01
    assert rank_deadline is not None and rank_deadline <= 0.2


async def test_rank_down_serves_the_recall_order_degraded(fake_stack: FakeStack):
    fake_stack.fake_rank.behaviour.fail_with = grpc.StatusCode.UNAVAILABLE
    response = await fake_stack.stub.Recommend(recommend("category", category="c2", n=10))
    assert response.degraded and list(response.degraded_reasons) == ["rank_unavailable"]
    scores = [item.score for item in response.items]
    assert scores == sorted(scores, reverse=True)  # recall scores, recall order
    assert response.model_version == "recall=fake-recall-1"


async def test_rank_slow_serves_the_recall_order_within_the_budget(fake_stack: FakeStack):
    fake_stack.fake_rank.behaviour.delay_s = 5.0
    started = time.monotonic()
    response = await fake_stack.stub.Recommend(recommend("home"), timeout=10)
    assert time.monotonic() - started < 1.0  # home's budget is 300 ms: never a hang
    assert response.degraded and list(response.degraded_reasons) == ["rank_deadline_exceeded"]
    assert len(response.items) == 20


async def test_recall_down_serves_the_cached_popular_table_still_filtered(fake_stack: FakeStack):
    fake_stack.fake_recall.behaviour.fail_with = grpc.StatusCode.UNAVAILABLE
    response = await fake_stack.stub.Recommend(recommend("category", category="c4", n=10))
    assert response.degraded and list(response.degraded_reasons) == ["recall_unavailable"]
    assert len(response.items) == 10 and {category_of(item_index(i)) for i in ids(response)} == {"c4"}
    assert {item.source for item in response.items} == {"popular"}

    await fake_stack.recall.stop()  # really gone, not just failing
    response = await fake_stack.stub.Recommend(recommend("home", n=5), timeout=2)
    assert response.degraded and response.degraded_reasons[0].startswith("recall_")
    assert len(response.items) == 5


async def test_history_store_down_serves_a_cold_start_degraded(fake_stack: FakeStack):
    store = fake_stack.gateway.servicer.pipeline.history_store

    async def broken_history(user_id: str, limit: int | None = None):
        raise ConnectionError("store down")

    store.history = broken_history
    response = await fake_stack.stub.Recommend(recommend("home", n=5))
    assert response.degraded and list(response.degraded_reasons) == ["history_unavailable"]
    assert len(response.items) == 5
    assert not history_ids(fake_stack.fake_recall.behaviour.requests[-1])


async def test_load_beyond_the_in_flight_limit_is_shed_at_once(tmp_path: Path, fake_stack: FakeStack):
    fake_stack.gateway.servicer.max_in_flight = 2
    gate = asyncio.Event()
    fake_stack.fake_recall.behaviour.blocked = gate
    held = [asyncio.ensure_future(fake_stack.stub.Recommend(recommend("home"), timeout=5)) for _ in range(2)]
    while fake_stack.gateway.servicer.in_flight < 2:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await fake_stack.stub.Recommend(recommend("home"), timeout=5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert time.monotonic() - started < 0.5
    gate.set()
    for response in await asyncio.gather(*held):
        assert response.items
    assert fake_stack.gateway.servicer.in_flight == 0


BAD_RECOMMENDS = [
    (recommend("nope"), "scenario: unknown scenario 'nope'"),
    (recommend(""), "scenario: must be one of"),
    (recommend("home", n=-3), "num_items: must be in 0..500"),
    (recommend("home", n=501), "num_items: must be in 0..500, got 501"),
    (recommend("home", user=""), "user_id: must not be empty"),
    (recommend("item_detail"), "context.item_ids: required by scenario 'item_detail'"),
    (recommend("category"), "context.category: required by scenario 'category'"),
    (recommend("item_detail", items=["bad id"]), "context.item_ids[0]: must not contain whitespace"),
    (
        recommend("home", history=[common_pb2.HistoryItem(item_id="")]),
        "history[0].item_id: must not be empty",
    ),
]


@pytest.mark.parametrize(("request_message", "message"), BAD_RECOMMENDS)
async def test_bad_recommend_fields_are_invalid_argument_naming_the_field(
    fake_stack, request_message, message
):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await fake_stack.stub.Recommend(request_message)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(message)


BAD_EVENTS = [
    ([], "events: must not be empty"),
    (
        [event("a", "i1"), event("b", "i2", event_type=common_pb2.EVENT_TYPE_UNSPECIFIED)],
        "events[1].type: must be one of VIEW, CLICK, ADD_TO_CART, PURCHASE, got EVENT_TYPE_UNSPECIFIED",
    ),
    ([event("a", "i1"), event("b", "i2"), event("c", "i3", event_type=42)], "events[2].type: must be one of"),
    ([event("", "i1")], "events[0].event_id: must not be empty"),
    ([event("a", "")], "events[0].item_id: must not be empty"),
    ([event("a", "i1", user="")], "events[0].user_id: must not be empty"),
    (
        [event("a", "i1", ts=NOW_MS + 24 * 3600 * 1000)],
        "events[0].timestamp_ms: must not be more than 300 s in the future",
    ),
    ([event("a", "i1", ts=-5)], "events[0].timestamp_ms: must be >= 0"),
]


@pytest.mark.parametrize(("events", "message"), BAD_EVENTS)
async def test_bad_events_are_invalid_argument_naming_the_field_and_nothing_is_stored(
    fake_stack, events, message
):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await fake_stack.stub.LogEvents(gateway_pb2.LogEventsRequest(events=events))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(message)
    assert await fake_stack.gateway.servicer.history_store.history("u1") == []


async def test_metrics_cover_stages_outcomes_candidates_fallbacks_events(fake_stack: FakeStack):
    stub = fake_stack.stub
    await stub.LogEvents(gateway_pb2.LogEventsRequest(events=[event("m1", "i3", common_pb2.PURCHASE)]))
    await stub.Recommend(recommend("home"))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.Recommend(recommend("home", n=-1))
    fake_stack.fake_rank.behaviour.fail_with = grpc.StatusCode.INTERNAL
    await stub.Recommend(recommend("home"))
    url = f"http://127.0.0.1:{fake_stack.gateway.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for line in [
        'recsys_stage_seconds_bucket{le="0.00025",scenario="home",stage="recall"}',
        'recsys_stage_seconds_count{scenario="home",stage="total"} 2.0',
        'recsys_requests_total{outcome="ok",scenario="home"} 1.0',
        'recsys_requests_total{outcome="invalid",scenario="home"} 1.0',
        'recsys_requests_total{outcome="degraded",scenario="home"} 1.0',
        'recsys_fallbacks_total{reason="rank_internal",scenario="home"} 1.0',
        'recsys_candidates_count{scenario="home",stage="recall"} 2.0',
        'recsys_events_ingested_total{type="purchase"} 1.0',
        "recsys_in_flight_requests 0.0",
        'recsys_bundle_info{kind="recall",service="gateway",version="fake-recall-1"} 1.0',
        'grpc_server_handled_total{grpc_code="INVALID_ARGUMENT",grpc_method="Recommend"',
    ]:
        assert line in text, line


async def test_the_scenario_file_reloads_without_restart_and_a_bad_edit_is_rejected(
    tmp_path: Path, fake_stack: FakeStack
):
    scenarios_path = tmp_path / "scenarios.yaml"
    document = yaml.safe_load(DEFAULT_SCENARIOS.read_text())
    scenarios_path.write_text(yaml.safe_dump(document))
    config = gateway_config(
        tmp_path,
        fake_stack.recall.address,
        fake_stack.rank.address,
        scenarios_path=scenarios_path,
        reload_interval_s=0.05,
        sqlite_path=tmp_path / "reload.sqlite3",
    )
    gateway = await serve(config, new_registry(False))
    channel = gateway_channel(gateway.address)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    try:
        document["scenarios"]["trending"] = {
            "personalised": False,
            "model_scenario": "home",
            "stages": [{"recall": {"sources": {"popular": 30}, "k": 30}}],
        }
        scenarios_path.write_text(yaml.safe_dump(document))
        os.utime(scenarios_path, (1, 1))
        for _ in range(100):
            if "trending" in gateway.scenarios.current.scenarios:
                break
            await asyncio.sleep(0.05)
        trending = await stub.Recommend(recommend("trending", user="", n=5))
        assert ids(trending) == ["i0", "i1", "i2", "i3", "i4"]
        assert fake_stack.fake_recall.behaviour.requests[-1].scenario == "home"

        document["scenarios"]["broken"] = {"stages": [{"rank": {}}]}
        scenarios_path.write_text(yaml.safe_dump(document))
        os.utime(scenarios_path, (2, 2))
        for _ in range(100):
            if gateway.scenarios.last_error:
                break
            await asyncio.sleep(0.05)
        assert "scenario 'broken', stage 'rank': needs ['candidates']" in gateway.scenarios.last_error
        assert (await stub.Recommend(recommend("trending", user="", n=5))).items  # old config kept
    finally:
        await channel.close()
        await gateway.stop(0)


async def test_recall_down_with_no_catalog_yet_is_unavailable_not_a_hang_then_recovers(tmp_path: Path):
    recall = FakeServer(FakeRecall(), recall_pb2_grpc.add_RecallServiceServicer_to_server)
    rank = FakeServer(FakeRank(), rank_pb2_grpc.add_RankServiceServicer_to_server)
    await recall.start()
    await rank.start()
    recall.servicer.behaviour.fail_with = grpc.StatusCode.UNAVAILABLE  # from the very start
    gateway = await serve(gateway_config(tmp_path, recall.address, rank.address), new_registry(False))
    try:
        async with gateway_channel(gateway.address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Recommend(recommend("home"), timeout=5)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "recall has not served the catalog yet" in error.value.details()

            recall.servicer.behaviour.fail_with = None  # recall comes back: the next calls fetch it
            for _ in range(100):
                if gateway.servicer.pipeline.catalog is not None:
                    break
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Recommend(recommend("home"), timeout=5)
                await asyncio.sleep(0.05)
            assert (await stub.Recommend(recommend("home"), timeout=5)).items
    finally:
        await gateway.stop(0)
        await recall.stop()
        await rank.stop()


async def test_a_downstream_on_another_catalog_is_reported_degraded_never_wrong_items(fake_stack: FakeStack):
    stub = fake_stack.stub
    fake_stack.fake_rank.catalog = "f" * 64  # rank loaded a bundle of another catalog
    response = await stub.Recommend(recommend("home", n=10))
    assert response.degraded and list(response.degraded_reasons) == ["rank_catalog_mismatch"]
    assert len(response.items) == 10 and "rank=" not in response.model_version

    fake_stack.fake_rank.catalog = CATALOG
    fake_stack.fake_recall.catalog = "f" * 64  # recall too: its indices would mean other items
    calls_before = fake_stack.fake_recall.catalog_calls
    response = await stub.Recommend(recommend("home", n=10))
    assert response.degraded and list(response.degraded_reasons) == ["recall_catalog_mismatch"]
    assert {item.source for item in response.items} == {"popular"}
    for _ in range(100):  # the mismatch made the gateway fetch the catalog again
        if fake_stack.fake_recall.catalog_calls > calls_before:
            break
        await asyncio.sleep(0.02)
    assert fake_stack.fake_recall.catalog_calls > calls_before


async def test_a_slow_history_store_is_cut_at_its_deadline_and_served_as_a_cold_start(fake_stack: FakeStack):
    store = fake_stack.gateway.servicer.pipeline.history_store

    async def slow_history(user_id: str, limit: int | None = None):
        await asyncio.sleep(2.0)
        return []

    store.history = slow_history
    started = time.monotonic()
    response = await fake_stack.stub.Recommend(recommend("home", n=5), timeout=5)
    assert time.monotonic() - started < 1.0  # not the store's 2 s
    assert response.degraded and list(response.degraded_reasons) == ["history_timeout"]
    assert len(response.items) == 5


async def test_num_items_zero_serves_the_scenarios_configured_default(fake_stack: FakeStack):
    home = await fake_stack.stub.Recommend(recommend("home", n=0))
    assert len(home.items) == 20  # home: num_items 20 (the file's default)
    ads = await fake_stack.stub.Recommend(recommend("ads", n=0))
    assert len(ads.items) == 10  # ads: num_items 10


async def test_stages_run_in_the_declared_order(tmp_path: Path, fake_stack: FakeStack):
    """A re-rank rule declared before rank runs before it: rank never sees what the rule dropped."""
    document = yaml.safe_load(DEFAULT_SCENARIOS.read_text())
    document["scenarios"]["context_first"] = {
        "model_scenario": "item_detail",
        "stages": [
            {"recall": {"sources": {"i2i": 50}, "k": 50, "seeds": "context.item_ids"}},
            {"rerank": [{"exclude_context": True}]},
            {"rank": {"max_candidates": 50}},
        ],
    }
    scenarios_path = tmp_path / "ordered.yaml"
    scenarios_path.write_text(yaml.safe_dump(document))
    registry = fake_stack.gateway.scenarios
    registry.path = scenarios_path
    assert registry.reload()
    response = await fake_stack.stub.Recommend(recommend("context_first", items=["i42"], n=10))
    ranked = candidates_of(fake_stack.fake_rank.behaviour.requests[-1])
    assert response.items and 42 not in ranked  # excluded before rank was asked
    assert "i42" not in ids(response)
