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

A service whose bundle is not given is called over gRPC at the gateway's address for it. Each
in-process stage takes its service's settings under its own prefix, flag or variable:
``--rank-threads`` / ``RECSYS_RANK_THREADS``, ``--rank-max-batch``, ``--rank-max-wait-ms``,
``--rank-max-queue``, ``--rank-bundle-poll-s`` (and ``--recall-*`` alike; ``RECSYS_RANK_BUNDLE`` for
the bundle), and swaps in a new bundle version the way its own service does (a versions folder's
``current`` link or a rewritten manifest, loaded, verified and warmed before it serves). The Helm
chart runs the ranker this way with ``rank.inGateway: true``, recall with ``recall.inGateway: true``
(both: the whole cascade in every gateway pod).
"""

from __future__ import annotations

from recsys.grpc_env import apply_serving_defaults

apply_serving_defaults()  # before anything below imports grpc

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from prometheus_client import CollectorRegistry

from gateway.config import GatewayConfig
from gateway.server import GatewayServer, serve
from rank_service.config import RankConfig
from rank_service.server import load_servicer as load_rank_servicer
from rank_service.server import warm_up as warm_up_rank
from rank_service.servicer import RankServicer
from recall_service.config import RecallConfig
from recall_service.server import load_servicer as load_recall_servicer
from recall_service.server import warm_up as warm_up_recall
from recall_service.servicer import RecallServicer
from recsys.scenario.spec import ScenarioConfigError
from recsys.serving.bootstrap import run_event_loop, run_until_signal
from recsys.serving.config import DEVICES, ConfigError, env_default
from recsys.serving.logging import configure_logging
from recsys.serving.metrics import new_registry
from recsys.serving.reload import Stoppable
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
        async with asyncio.timeout(timeout):  # no task per call, unlike wait_for
            return await work(deadline)
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
    """The recall service's servicer (batcher, metrics, bundle watcher; started by
    :func:`watch_bundles`), warmed up."""
    recall = await load_recall_servicer(config, registry)
    await warm_up_recall(recall)
    return LocalRecall(recall)


async def load_rank(config: RankConfig, registry: CollectorRegistry) -> LocalRank:
    """The rank service's servicer (batcher, metrics, bundle watcher; started by
    :func:`watch_bundles`), warmed up."""
    rank = await load_rank_servicer(config, registry)
    await warm_up_rank(rank)
    return LocalRank(rank)


async def load_backends(
    recall_config: RecallConfig, rank_config: RankConfig, registry: CollectorRegistry
) -> tuple[LocalRecall, LocalRank]:
    """Both services in this process."""
    return await load_recall(recall_config, registry), await load_rank(rank_config, registry)


def watch_bundles(backends: Sequence[LocalRecall | LocalRank | None], running: Stoppable) -> None:
    """Start each in-process stage's bundle watcher (polling until ``running`` stops)."""
    for backend in backends:
        if backend is not None and backend.servicer.bundle_watcher is not None:
            backend.servicer.bundle_watcher.start(running)


async def serve_inprocess(
    config: GatewayConfig,
    recall: RecallConfig | None,
    rank: RankConfig | None,
    registry: CollectorRegistry | None = None,
) -> GatewayServer:
    """The gateway serving with in-process recall and/or rank; the stage whose config is None is
    called over gRPC as ``config`` says. Each in-process stage swaps in new bundle versions as
    its own service does (``bundle_poll_s``)."""
    if recall is None and rank is None:
        raise ValueError("serve_inprocess needs a recall bundle, a rank bundle or both")
    registry = new_registry() if registry is None else registry
    local_recall = None if recall is None else await load_recall(recall, registry)
    local_rank = None if rank is None else await load_rank(rank, registry)
    gateway = await serve(config, registry, backends=(local_recall, local_rank))
    watch_bundles((local_recall, local_rank), gateway.running)
    return gateway


def local_configs(
    recall_bundle: Path | None, rank_bundle: Path | None, device: str = "auto"
) -> tuple[RecallConfig | None, RankConfig | None]:
    """In-process configs with each service's defaults for the given bundles (None: over gRPC)."""
    return (
        None if recall_bundle is None else RecallConfig.embedded(recall_bundle, device),
        None if rank_bundle is None else RankConfig.embedded(rank_bundle, device),
    )


def parse_args(argv: Sequence[str]) -> tuple[RecallConfig | None, RankConfig | None, GatewayConfig]:
    """The in-process stages' configs (None: that stage over gRPC) and the gateway's, from flags
    and RECSYS_* variables; a bad or missing setting exits with a usage error naming it."""
    parser = argparse.ArgumentParser(
        prog="python -m recsys.app.inprocess", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    RecallConfig.add_embedded_arguments(parser)
    RankConfig.add_embedded_arguments(parser)
    try:
        device = env_default("RECSYS_DEVICE", "auto")
    except ConfigError as error:
        parser.error(str(error))
    parser.add_argument(
        "--device",
        default=device,
        choices=DEVICES,
        help=f"where in-process models run (env RECSYS_DEVICE; now {device})",
    )
    args, gateway_argv = parser.parse_known_args(list(argv))
    try:
        recall = RecallConfig.from_embedded_args(args, args.device)
        rank = RankConfig.from_embedded_args(args, args.device)
    except ConfigError as error:
        parser.error(str(error))
    if recall is None and rank is None:
        parser.error(
            "give --recall-bundle, --rank-bundle or both (env RECSYS_RECALL_BUNDLE, RECSYS_RANK_BUNDLE)"
        )
    return recall, rank, GatewayConfig.from_args(gateway_argv)


def main(argv: list[str] | None = None) -> int:
    recall, rank, config = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging("gateway", config.serving.log_level)

    async def run() -> None:
        gateway = await serve_inprocess(config, recall, rank)
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
