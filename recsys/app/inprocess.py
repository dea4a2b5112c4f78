"""The gateway with recall and/or rank in its own process (no gRPC hop to them).

:class:`LocalRecall` and :class:`LocalRank` have the methods of the gRPC stubs the gateway's
pipeline calls, but run the recall and rank servicers' own code (validation, micro-batcher,
engine / runtime, packed answers) in this process. The gateway therefore runs the very same
pipeline either way, which is what ``recsys bench e2e`` compares to measure what the gRPC hops
cost. Two deployments come out of it:

    # the whole cascade in one process (a small shop)
    python -m recsys.app.inprocess --recall-bundle DIR --rank-bundle DIR [gateway flags ...]
    # the ranker inside the gateway, recall (sharded or not) over gRPC: one hop fewer
    python -m recsys.app.inprocess --rank-bundle DIR --recall-address HOST:PORT [gateway flags ...]

A service whose bundle is not given is called over gRPC at the gateway's address for it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry

from gateway.config import GatewayConfig
from gateway.server import GatewayServer, serve
from rank_service.config import RankConfig
from rank_service.runtime import RankRuntime
from rank_service.server import warm_up as warm_up_rank
from rank_service.servicer import RankServicer
from recall_service.config import RecallConfig
from recall_service.engine import RecallEngine
from recall_service.server import build_servicer as build_recall_servicer
from recall_service.server import warm_up as warm_up_recall
from recall_service.servicer import RecallServicer
from recsys.scenario.spec import ScenarioConfigError
from recsys.serving.bootstrap import run_event_loop, run_until_signal
from recsys.serving.config import ServingConfig
from recsys.serving.logging import configure_logging
from recsys.serving.metrics import new_registry
from recsys.serving.validation import EXPECTED_ERRORS, error_status, rpc_error
from recsys.v1 import rank_pb2, recall_pb2

log = logging.getLogger(__name__)
Response = TypeVar("Response")


async def _call(work: Callable[[float | None], Awaitable[Response]], timeout: float | None) -> Response:
    """Run ``work(deadline)`` under ``timeout`` and turn the servicers' errors into the status
    errors a gRPC stub would raise, so the pipeline handles both backends alike."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        return await asyncio.wait_for(work(deadline), timeout)
    except TimeoutError:
        raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
    except EXPECTED_ERRORS as error:  # a bad field, a catalog mismatch, a shed or expired request
        raise rpc_error(*error_status(error)) from None


class LocalRecall:
    """``RecallServiceStub`` look-alike over a :class:`RecallServicer` in this process."""

    def __init__(self, servicer: RecallServicer):
        self.servicer = servicer

    async def Recall(
        self, request: recall_pb2.RecallRequest, timeout: float | None = None, **_: Any
    ) -> recall_pb2.RecallResponse:
        return await _call(lambda deadline: self.servicer.recall(request, deadline), timeout)

    async def UserProfile(
        self, request: recall_pb2.UserProfileRequest, timeout: float | None = None, **_: Any
    ) -> recall_pb2.UserProfileResponse:
        return await _call(lambda deadline: self.servicer.user_profile(request, deadline), timeout)

    def GetCatalog(
        self, request: recall_pb2.CatalogRequest, **_: Any
    ) -> AsyncIterator[recall_pb2.CatalogChunk]:
        async def chunks() -> AsyncIterator[recall_pb2.CatalogChunk]:
            for chunk in self.servicer.catalog_chunks(request.known_catalog):
                yield chunk

        return chunks()


class LocalRank:
    """``RankServiceStub`` look-alike over a :class:`RankServicer` in this process."""

    def __init__(self, servicer: RankServicer):
        self.servicer = servicer

    async def Rank(
        self, request: rank_pb2.RankRequest, timeout: float | None = None, **_: Any
    ) -> rank_pb2.RankResponse:
        return await _call(lambda deadline: self.servicer.rank(request, deadline), timeout)


async def load_recall(config: RecallConfig, registry: CollectorRegistry) -> LocalRecall:
    """Load the recall bundle, build its servicer (batcher, metrics) and warm it up."""
    engine = await asyncio.to_thread(RecallEngine.load, config.bundle, config.device, config.threads)
    recall = build_recall_servicer(engine, config, registry)
    await warm_up_recall(recall)
    return LocalRecall(recall)


async def load_rank(config: RankConfig, registry: CollectorRegistry) -> LocalRank:
    """Load the rank bundle, build its servicer (batcher, metrics) and warm it up."""
    runtime = await asyncio.to_thread(RankRuntime.load, config.bundle, config.device, config.threads)
    rank = RankServicer(runtime, registry, config.max_batch, config.max_wait_ms, config.max_queue)
    await warm_up_rank(rank)
    return LocalRank(rank)


async def load_backends(
    recall_config: RecallConfig, rank_config: RankConfig, registry: CollectorRegistry
) -> tuple[LocalRecall, LocalRank]:
    """Both services in this process."""
    return await load_recall(recall_config, registry), await load_rank(rank_config, registry)


async def serve_inprocess(
    config: GatewayConfig,
    recall_bundle: Path | None,
    rank_bundle: Path | None,
    registry: CollectorRegistry | None = None,
    device: str = "auto",
) -> GatewayServer:
    """The gateway serving with in-process recall and/or rank (defaults of their configs); the
    one whose bundle is None is called over gRPC as ``config`` says."""
    if recall_bundle is None and rank_bundle is None:
        raise ValueError("serve_inprocess needs a recall bundle, a rank bundle or both")
    registry = new_registry() if registry is None else registry
    serving = ServingConfig()
    recall = rank = None
    if recall_bundle is not None:
        recall_config = RecallConfig(serving=serving, bundle=recall_bundle, device=device)
        recall = await load_recall(recall_config, registry)
    if rank_bundle is not None:
        rank = await load_rank(RankConfig(serving=serving, bundle=rank_bundle, device=device), registry)
    return await serve(config, registry, backends=(recall, rank))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys.app.inprocess", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--recall-bundle", type=Path, help="recall in this process (else over gRPC)")
    parser.add_argument("--rank-bundle", type=Path, help="rank in this process (else over gRPC)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    args, gateway_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.recall_bundle is None and args.rank_bundle is None:
        parser.error("give --recall-bundle, --rank-bundle or both")
    config = GatewayConfig.from_args(gateway_argv)
    configure_logging("gateway", config.serving.log_level)

    async def run() -> None:
        gateway = await serve_inprocess(config, args.recall_bundle, args.rank_bundle, device=args.device)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_scenarios)
        try:
            await run_until_signal(gateway)  # type: ignore[arg-type]
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            await gateway.stop()

    try:
        run_event_loop(run())  # the loop the services run on
    except ScenarioConfigError as error:
        print(f"recsys.app.inprocess: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
