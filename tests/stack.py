"""The whole stack in-process for tests: real recall, rank and gateway servers on port 0.

    async with running_stack(recall_bundle, rank_bundle, tmp_path, max_in_flight=4) as stack:
        stub = GatewayStub(stack.gateway_channel())  # its calls carry a token with every scope
        ...
        await stack.stop_rank()   # fallback tests

Keyword arguments override fields of the gateway's :class:`GatewayConfig` (history backend,
Redis URL, scenario file, in-flight limit, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gateway.config import DEFAULT_SCENARIOS, GatewayConfig
from gateway.server import GatewayServer
from gateway.server import serve as serve_gateway
from recsys.serving.auth import SCOPES, BearerTokenInterceptor, write_tokens_file
from recsys.serving.bootstrap import RunningServer
from recsys.serving.config import ServingConfig

STACK_TOKEN = "stack-token-with-every-scope"  # the gateway of running_stack accepts it


def loopback_serving() -> ServingConfig:
    """Loopback, any free ports, a short shutdown grace."""
    return ServingConfig(host="127.0.0.1", port=0, metrics_port=0, grace_seconds=0.5)


@dataclass
class RunningStack:
    """Three running servers and how to reach them."""

    recall: RunningServer
    rank: RunningServer
    gateway: GatewayServer

    @property
    def gateway_address(self) -> str:
        return self.gateway.address

    def gateway_channel(self, token: str | None = STACK_TOKEN) -> grpc.aio.Channel:
        """A channel to the gateway whose calls carry ``token`` (None: unauthenticated)."""
        interceptors = [BearerTokenInterceptor(token)] if token is not None else None
        return grpc.aio.insecure_channel(self.gateway_address, interceptors=interceptors)

    @property
    def recall_address(self) -> str:
        return self.recall.address

    @property
    def rank_address(self) -> str:
        return self.rank.address

    @property
    def metrics_urls(self) -> dict[str, str]:
        """service -> its /metrics URL."""
        return {
            name: f"http://127.0.0.1:{server.metrics_port}/metrics"
            for name, server in (("recall", self.recall), ("rank", self.rank), ("gateway", self.gateway))
        }

    async def stop_recall(self) -> None:
        """Stop the recall server (the gateway must fall back to its popular table)."""
        await self.recall.stop(0)

    async def stop_rank(self) -> None:
        """Stop the rank server (the gateway must fall back to the recall order)."""
        await self.rank.stop(0)


@contextlib.asynccontextmanager
async def running_stack(
    recall_bundle: Path, rank_bundle: Path, tmp_path: Path, **gateway_overrides: Any
) -> AsyncIterator[RunningStack]:
    """Start recall, rank, then the gateway pointed at them; stop all three on exit."""
    from rank_service.config import RankConfig
    from rank_service.server import serve as serve_rank
    from recall_service.config import RecallConfig
    from recall_service.server import serve as serve_recall

    async with contextlib.AsyncExitStack() as stack:
        recall = await serve_recall(
            RecallConfig(serving=loopback_serving(), bundle=Path(recall_bundle), device="cpu")
        )
        stack.push_async_callback(recall.stop, 0)
        rank = await serve_rank(
            RankConfig(serving=loopback_serving(), bundle=Path(rank_bundle), device="cpu")
        )
        stack.push_async_callback(rank.stop, 0)
        tokens_path = Path(tmp_path) / "auth-tokens.json"
        write_tokens_file(tokens_path, [("stack", STACK_TOKEN, SCOPES)])
        config = GatewayConfig(
            serving=loopback_serving(),
            scenarios_path=DEFAULT_SCENARIOS,
            recall_address=recall.address,
            rank_address=rank.address,
            sqlite_path=Path(tmp_path) / "gateway-history.sqlite3",
            auth_tokens_file=tokens_path,
        )
        gateway = await serve_gateway(dataclasses.replace(config, **gateway_overrides))
        stack.push_async_callback(gateway.stop, 0)
        yield RunningStack(recall=recall, rank=rank, gateway=gateway)
