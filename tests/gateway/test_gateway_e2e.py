"""End to end: real recall, rank and gateway servers on port 0 over the tiny bundles.

Every scenario of the shipped config, the event-then-recommend loop on both history backends,
both fallbacks (rank stopped, recall stopped), load shedding, config rejection, bad fields, and
the served result equal to the offline RecallEngine + RankRuntime result for the same history.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
import yaml

from gateway.config import DEFAULT_SCENARIOS, GatewayConfig
from gateway.server import serve
from recsys.scenario.spec import ScenarioConfigError
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.gateway.conftest import stretch_budgets
from tests.stack import RunningStack, loopback_serving, running_stack

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

OFFLINE_K = 50


def scenarios_with_offline_check(path: Path) -> Path:
    """The shipped scenarios plus one that mirrors the offline pipeline eval (no re-rank rules).

    Every budget is stretched 10x: these tests assert behaviour, and a busy 2-core CI machine must
    not turn a slow first call into a degraded (fallback) answer.
    """
    document = stretch_budgets(yaml.safe_load(DEFAULT_SCENARIOS.read_text()), factor=10)
    document["scenarios"]["offline_check"] = {
        "model_scenario": "home",
        "timeout_ms": 5000,
        "stages": [
            {"recall": {"k": OFFLINE_K, "filters": {"exclude_history": True}, "timeout_ms": 2500}},
            {"rank": {"max_candidates": OFFLINE_K, "timeout_ms": 2500}},
        ],
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(recall_bundle: Path, rank_bundle: Path, tmp_path_factory) -> AsyncIterator[RunningStack]:
    tmp_path = tmp_path_factory.mktemp("gateway-e2e")
    scenarios = scenarios_with_offline_check(tmp_path / "scenarios.yaml")
    async with running_stack(recall_bundle, rank_bundle, tmp_path, scenarios_path=scenarios) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(stack: RunningStack) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    async with stack.gateway_channel() as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def recommend(
    scenario: str,
    user: str = "e2e-user",
    n: int = 10,
    items=(),
    category: str = "",
    history=None,
    debug: bool = False,
) -> gateway_pb2.RecommendRequest:
    return gateway_pb2.RecommendRequest(
        request_id=f"{scenario}-{user}",
        user_id=user,
        scenario=scenario,
        num_items=n,
        debug=debug,
        context=gateway_pb2.RecommendContext(item_ids=list(items), category=category),
        history=history or [],
    )


def user_history(dataset, user: int) -> list[common_pb2.HistoryItem]:
    items = dataset.items.external_many(dataset.sequences[user])
    events = dataset.events_of(user)
    return [common_pb2.HistoryItem(item_id=i, type=int(e)) for i, e in zip(items, events, strict=True)]


def ids(response: gateway_pb2.RecommendResponse) -> list[str]:
    return [item.item_id for item in response.items]


async def log_history(stub, user_id: str, history: list[common_pb2.HistoryItem], start_ms: int = 1_000_000):
    events = [
        gateway_pb2.Event(
            event_id=f"{user_id}-{i}",
            user_id=user_id,
            item_id=h.item_id,
            type=h.type or 1,
            timestamp_ms=start_ms + i,
        )
        for i, h in enumerate(history)
    ]
    return await stub.LogEvents(gateway_pb2.LogEventsRequest(events=events))


async def test_the_gateway_is_connected_to_rank_and_recall_when_it_reports_ready(stack):
    # First in this file: no request has been served yet, so only the start-up could connect them.
    channels = stack.gateway._channels
    assert len(channels) == 2
    assert all(channel.get_state() is grpc.ChannelConnectivity.READY for channel in channels)


async def test_every_shipped_scenario_serves_items_that_obey_its_rules(stub, synthetic_dataset):
    dataset = synthetic_dataset
    catalog = dataset.catalog
    history = user_history(dataset, 0)
    await log_history(stub, "e2e-user", history)

    home = await stub.Recommend(recommend("home", debug=True))
    assert len(home.items) == 10 and not home.degraded, home.degraded_reasons
    assert not set(ids(home)) & {h.item_id for h in history}  # seen items excluded
    assert "recall=" in home.model_version and "rank=" in home.model_version
    history_ids = {h.item_id for h in history}
    for item in home.items:
        assert item.sources and item.explanation.startswith("recall:")
        assert set(item.attended_item_ids) <= history_ids

    viewed = history[-1].item_id
    detail = await stub.Recommend(recommend("item_detail", items=[viewed]))
    assert detail.items and viewed not in ids(detail) and not detail.degraded

    cart = await stub.Recommend(recommend("cart", items=[viewed]))
    assert cart.items and viewed not in ids(cart) and not cart.degraded

    category_id = int(catalog.category[dataset.items.dense(viewed)])
    category_name = catalog.category_names[category_id]
    category = await stub.Recommend(recommend("category", category=category_name))
    assert category.items and not category.degraded
    assert {int(catalog.category[dataset.items.dense(i)]) for i in ids(category)} == {category_id}

    ads = await stub.Recommend(recommend("ads", n=5))
    assert ads.items and not ads.degraded
    assert all(catalog.bid[dataset.items.dense(i)] >= 0.01 for i in ids(ads))
    revenue = [item.score for item in ads.items]
    assert revenue == sorted(revenue, reverse=True)


async def test_served_result_equals_the_offline_recall_and_rank(
    stub, synthetic_dataset, recall_bundle, rank_bundle
):
    from rank_service.candidates import RecallCandidates
    from rank_service.runtime import RankRuntime

    dataset = synthetic_dataset
    user = 3
    history = user_history(dataset, user)
    served = await stub.Recommend(
        recommend("offline_check", user="offline", n=OFFLINE_K, history=history), timeout=10
    )
    assert not served.degraded, served.degraded_reasons

    dense_history = np.asarray(dataset.sequences[user], dtype=np.int64)
    events = np.asarray(dataset.events_of(user), dtype=np.int64)
    candidates = RecallCandidates.load(recall_bundle, threads=1).generate(
        [dense_history], [events], ["home"], OFFLINE_K
    )[0]
    runtime = RankRuntime.load(rank_bundle, device="cpu", threads=1)
    (scores,) = runtime.score([candidates.query(dense_history, events, runtime.scenario_id("home"))])
    order = np.argsort(-scores, kind="stable")
    offline_ids = dataset.items.external_many(candidates.items[order])
    assert ids(served) == offline_ids
    np.testing.assert_allclose([item.score for item in served.items], scores[order], rtol=1e-5, atol=1e-5)


async def test_the_offline_scenario_evaluator_serves_exactly_what_the_gateway_serves(
    stack, stub, synthetic_dataset, recall_bundle, rank_bundle
):
    """Same bundles, same scenario file: `recsys eval --scenario` (the pipeline in process) and
    the real gateway over gRPC return identical item lists for every shipped scenario."""
    from recsys.app.scenario_eval import NUM_ITEMS, OfflinePipeline, scenario_request
    from recsys.data.split import LeaveOneOutSplit

    dataset = synthetic_dataset
    split = LeaveOneOutSplit(dataset)
    offline = await OfflinePipeline.load(recall_bundle, rank_bundle, stack.gateway.scenarios.path)
    try:
        compared = 0
        for name in ("home", "item_detail", "cart", "category", "ads"):
            scenario = offline.scenario(name)
            for user in split.eval_users[:4].tolist():
                history = split.history(user, "test")
                inputs = scenario_request(
                    dataset, scenario, user, history, split.target(user, "test"), NUM_ITEMS
                )
                if inputs is None:
                    continue
                expected = (await offline.serve(inputs)).item_ids
                served = await stub.Recommend(
                    recommend(
                        name,
                        user=inputs.user_id,
                        n=NUM_ITEMS,
                        items=inputs.context_item_ids,
                        category=inputs.context_category,
                        history=list(inputs.history or ()),
                    ),
                    timeout=10,
                )
                assert not served.degraded, served.degraded_reasons
                assert ids(served) == expected, (name, user)
                compared += 1
        assert compared >= 16
    finally:
        await offline.close()


async def test_concurrent_requests_share_batch_calls_and_get_the_answers_they_get_alone(
    stack, stub, synthetic_dataset
):
    """The gateway coalesces the recall and rank calls of concurrent requests into batch calls
    (downstream_in_flight 1 by default): every answer is the one the request gets on its own."""
    dataset = synthetic_dataset
    requests = []
    for user in range(24):
        scenario = ("home", "item_detail", "cart")[user % 3]
        history = user_history(dataset, user)[:8]
        items = [history[-1].item_id] if scenario != "home" else []
        requests.append(recommend(scenario, user=f"batch-{user}", n=10, items=items, history=history))
    alone = [await stub.Recommend(request, timeout=10) for request in requests]
    registry = stack.gateway.running.registry

    def requests_in_batch_calls(service: str) -> float:
        labels = {"service": service}
        total = registry.get_sample_value("recsys_gateway_downstream_call_requests_sum", labels) or 0.0
        calls = registry.get_sample_value("recsys_gateway_downstream_call_requests_count", labels) or 0.0
        return total - calls  # 0 while every call carries one request

    before = {service: requests_in_batch_calls(service) for service in ("recall", "rank")}
    together = await asyncio.gather(*(stub.Recommend(request, timeout=10) for request in requests))
    for service in ("recall", "rank"):
        assert requests_in_batch_calls(service) > before[service], f"no batch call to {service}"
    for single, batched in zip(alone, together, strict=True):
        assert not batched.degraded, batched.degraded_reasons
        assert ids(batched) == ids(single)
        np.testing.assert_allclose(
            [item.score for item in batched.items], [item.score for item in single.items], atol=1e-5
        )


async def test_a_cart_event_changes_the_next_cart_recommendation_sqlite(stub, synthetic_dataset):
    await check_event_then_recommend(stub, synthetic_dataset, "loop-sqlite")


async def check_event_then_recommend(stub, dataset, user_id: str) -> None:
    before = await stub.Recommend(recommend("cart", user=user_id))
    item = dataset.items.external(int(dataset.sequences[5][-1]))
    logged = await stub.LogEvents(
        gateway_pb2.LogEventsRequest(
            events=[
                gateway_pb2.Event(
                    event_id=f"{user_id}-cart-1", user_id=user_id, item_id=item, type=common_pb2.ADD_TO_CART
                )
            ]
        )
    )
    assert (logged.accepted, logged.duplicates) == (1, 0)
    after = await stub.Recommend(recommend("cart", user=user_id))
    assert after.items and ids(after) != ids(before)
    assert item not in ids(after)
    again = await stub.LogEvents(
        gateway_pb2.LogEventsRequest(
            events=[
                gateway_pb2.Event(
                    event_id=f"{user_id}-cart-1", user_id=user_id, item_id=item, type=common_pb2.ADD_TO_CART
                )
            ]
        )
    )
    assert (again.accepted, again.duplicates) == (0, 1)


@pytest.mark.parametrize(
    ("request_message", "message"),
    [
        (recommend("no_such_scenario"), "scenario: unknown scenario"),
        (recommend("home", n=-1), "num_items: must be in 0..500"),
        (recommend("home", n=501), "num_items: must be in 0..500"),
        (recommend("home", user=""), "user_id: must not be empty"),
        (recommend("item_detail"), "context.item_ids: required by scenario 'item_detail'"),
    ],
)
async def test_bad_fields_are_invalid_argument_naming_the_field(stub, request_message, message):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.Recommend(request_message)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(message)


async def test_bad_events_are_invalid_argument_naming_the_field(stub):
    events = [
        gateway_pb2.Event(event_id="ok", user_id="u", item_id="i", type=common_pb2.VIEW),
        gateway_pb2.Event(event_id="ok2", user_id="u", item_id="i", type=common_pb2.CLICK),
        gateway_pb2.Event(event_id="bad", user_id="u", item_id="i", type=common_pb2.EVENT_TYPE_UNSPECIFIED),
    ]
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.LogEvents(gateway_pb2.LogEventsRequest(events=events))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(
        "events[2].type: must be one of VIEW, CLICK, ADD_TO_CART, PURCHASE"
    )


# -- stacks of their own: another backend, stopped servers, a tiny in-flight limit -------------


async def test_a_cart_event_changes_the_next_cart_recommendation_redis(
    recall_bundle, rank_bundle, tmp_path, redis_url, synthetic_dataset
):
    async with (
        running_stack(
            recall_bundle, rank_bundle, tmp_path, history_backend="redis", redis_url=redis_url
        ) as running,
        running.gateway_channel() as channel,
    ):
        await check_event_then_recommend(
            gateway_pb2_grpc.GatewayStub(channel), synthetic_dataset, "loop-redis"
        )


async def test_fallbacks_rank_stopped_then_recall_stopped(recall_bundle, rank_bundle, tmp_path):
    async with (
        running_stack(recall_bundle, rank_bundle, tmp_path) as running,
        running.gateway_channel() as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        healthy = await stub.Recommend(recommend("home", user="fallback", n=10))
        assert not healthy.degraded

        await running.stop_rank()
        no_rank = await stub.Recommend(recommend("home", user="fallback", n=10), timeout=3)
        assert no_rank.degraded and no_rank.degraded_reasons[0].startswith("rank_")
        assert len(no_rank.items) == 10 and "rank=" not in no_rank.model_version

        await running.stop_recall()
        no_recall = await stub.Recommend(recommend("home", user="fallback", n=10), timeout=3)
        assert no_recall.degraded and any(r.startswith("recall_") for r in no_recall.degraded_reasons)
        pipeline = running.gateway.servicer.pipeline
        catalog = pipeline.catalog
        popular = [catalog.item_ids[i] for i in catalog.popular[: pipeline.fallback_depth]]
        assert ids(no_recall) and set(ids(no_recall)) <= set(popular)
        assert {item.source for item in no_recall.items} == {"popular"}


async def test_load_beyond_the_in_flight_limit_is_shed(recall_bundle, rank_bundle, tmp_path):
    async with (
        running_stack(recall_bundle, rank_bundle, tmp_path, max_in_flight=1) as running,
        running.gateway_channel() as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        results = await asyncio.gather(
            *(stub.Recommend(recommend("home", user=f"burst-{i}"), timeout=10) for i in range(30)),
            return_exceptions=True,
        )
        shed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        served = [r for r in results if isinstance(r, gateway_pb2.RecommendResponse)]
        assert shed and served
        assert {error.code() for error in shed} == {grpc.StatusCode.RESOURCE_EXHAUSTED}


async def test_an_invalid_scenario_file_is_rejected_at_start(stack: RunningStack, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"scenarios": {"home": {"stages": [{"rank": {}}, {"recall": {"k": 10}}]}}}))
    config = GatewayConfig(
        serving=loopback_serving(),
        scenarios_path=bad,
        recall_address=stack.recall_address,
        rank_address=stack.rank_address,
        sqlite_path=tmp_path / "h.sqlite3",
        allow_unauthenticated=True,
    )
    with pytest.raises(ScenarioConfigError, match="scenario 'home', stage 'rank': needs \\['candidates'\\]"):
        await serve(config)
