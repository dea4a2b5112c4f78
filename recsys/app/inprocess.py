"""The cascade in one process: the gateway with in-process recall and rank backends (no gRPC hops).

:class:`LocalRecall` and :class:`LocalRank` have the methods of the gRPC stubs the gateway's
pipeline calls, but run the recall and rank servicers' own code (validation, micro-batcher,
engine / runtime, packed answers) in this process. The gateway therefore runs the very same
pipeline either way, which is what ``recsys bench e2e`` compares to measure what the gRPC hops
cost; it is also a one-process deployment for small shops:

    python -m recsys.app.inprocess --recall-bundle DIR --rank-bundle DIR [gateway flags ...]
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
from recsys.serving.validation import InvalidArgument, StatusError
from recsys.v1 import rank_pb2, recall_pb2

log = logging.getLogger(__name__)
Response = TypeVar("Response")


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


async def _call(work: Callable[[float | None], Awaitable[Response]], timeout: float | None) -> Response:
    """Run ``work(deadline)`` under ``timeout`` and turn the servicers' errors into the status
    errors a gRPC stub would raise, so the pipeline handles both backends alike."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        return await asyncio.wait_for(work(deadline), timeout)
    except TimeoutError:
        raise _rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded") from None
    except InvalidArgument as error:
        raise _rpc_error(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
    except StatusError as error:  # a catalog mismatch, a shed or expired batch request
        raise _rpc_error(error.status, str(error)) from None


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


async def load_backends(
    recall_config: RecallConfig, rank_config: RankConfig, registry: CollectorRegistry
) -> tuple[LocalRecall, LocalRank]:
    """Load both bundles, build their servicers (batchers, metrics) and warm them up."""
    engine = await asyncio.to_thread(
        RecallEngine.load, recall_config.bundle, recall_config.device, recall_config.threads
    )
    runtime = await asyncio.to_thread(
        RankRuntime.load, rank_config.bundle, rank_config.device, rank_config.threads
    )
    recall = build_recall_servicer(engine, recall_config, registry)
    rank = RankServicer(
        runtime, registry, rank_config.max_batch, rank_config.max_wait_ms, rank_config.max_queue
    )
    await warm_up_recall(recall)
    await warm_up_rank(rank)
    return LocalRecall(recall), LocalRank(rank)


async def serve_inprocess(
    config: GatewayConfig,
    recall_bundle: Path,
    rank_bundle: Path,
    registry: CollectorRegistry | None = None,
    device: str = "auto",
) -> GatewayServer:
    """The gateway serving with in-process recall and rank (defaults of their configs)."""
    registry = new_registry() if registry is None else registry
    serving = ServingConfig()
    backends = await load_backends(
        RecallConfig(serving=serving, bundle=recall_bundle, device=device),
        RankConfig(serving=serving, bundle=rank_bundle, device=device),
        registry,
    )
    return await serve(config, registry, backends=backends)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recsys.app.inprocess", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--recall-bundle", type=Path, required=True)
    parser.add_argument("--rank-bundle", type=Path, required=True)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    args, gateway_argv = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
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
