"""The gateway in front of sharded recall (RECSYS_RECALL_ADDRESSES): the same items as one
unsharded recall, a shard down degrades the answer instead of failing it, and a user profile
comes from whichever shard answers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from recall_service.config import RecallConfig
from recall_service.server import serve as serve_recall
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.stack import loopback_serving, running_stack

pytestmark = pytest.mark.integration
SHARDS = 3


async def test_the_gateway_fans_out_to_recall_shards_and_degrades_when_one_is_down(
    recall_bundle: Path, rank_bundle: Path, tmp_path: Path
):
    base = RecallConfig(serving=loopback_serving(), bundle=Path(recall_bundle), device="cpu", threads=1)
    shards = [
        await serve_recall(dataclasses.replace(base, recall_shards=SHARDS, recall_shard_index=i))
        for i in range(SHARDS)
    ]
    try:
        request = gateway_pb2.RecommendRequest(user_id="user-000007", scenario="home", num_items=20)
        async with running_stack(recall_bundle, rank_bundle, tmp_path / "one") as unsharded:
            channel = unsharded.gateway_channel()
            want = await gateway_pb2_grpc.GatewayStub(channel).Recommend(request, timeout=10)
            await channel.close()
        addresses = tuple(shard.address for shard in shards)
        async with running_stack(
            recall_bundle, rank_bundle, tmp_path / "sharded", recall_addresses=addresses
        ) as sharded:
            channel = sharded.gateway_channel()
            stub = gateway_pb2_grpc.GatewayStub(channel)
            got = await stub.Recommend(request, timeout=10)
            assert not got.degraded
            assert [item.item_id for item in got.items] == [item.item_id for item in want.items]
            history = [common_pb2.HistoryItem(item_id=item.item_id) for item in got.items[:5]]
            profile_request = gateway_pb2.GetUserProfileRequest(user_id="user-000007", history=history)
            profile = await stub.GetUserProfile(profile_request, timeout=10)
            assert profile.nearest and not profile.degraded  # any shard holds every centroid
            await shards[0].stop(0)
            profile = await stub.GetUserProfile(profile_request, timeout=10)
            assert profile.nearest and not profile.degraded  # the next shard answers
            await shards[1].stop(0)
            degraded = await stub.Recommend(request, timeout=10)
            assert degraded.items and degraded.degraded
            assert list(degraded.degraded_reasons) == ["recall_shard_unavailable"]
            await channel.close()
    finally:
        for shard in shards:
            await shard.stop(0)
