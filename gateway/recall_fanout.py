"""Recall over shards: one object with the recall stub's methods that fans out to every shard.

Each recall shard owns a disjoint item range and serves the whole catalog (see
``recall_service.config``: ``RECSYS_RECALL_SHARDS`` / ``RECSYS_RECALL_SHARD_INDEX``).
:meth:`ShardedRecall.Recall` sends the request to every shard at once under the caller's one
timeout, asking each for its unmerged source lists, and merges them with the recall service's own
merge (:func:`recsys.recall_merge.merge_shards`): with every shard up the answer is the one an
unsharded recall would give. A shard that fails, times out or answers nonsense is left out and
the answer carries ``degraded_reasons`` (``recall_shard_unavailable``); only when no shard
answers does the call fail, with a shard's own error, so the pipeline falls back as it would for
one recall. :meth:`ShardedRecall.GetCatalog` streams the catalog from the first shard that
serves it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from recsys.recall_merge import candidates_response, merge_shards, source_lists_from_response
from recsys.serving.metrics import get_or_create
from recsys.serving.validation import InvalidArgument, rpc_error
from recsys.v1 import recall_pb2, recall_pb2_grpc

log = logging.getLogger(__name__)

SHARD_UNAVAILABLE = "recall_shard_unavailable"
SHARD_MISCONFIGURED = "recall_shard_misconfigured"


def unavailable(details: str) -> grpc.aio.AioRpcError:
    """The error a recall stub raises for an unreachable server."""
    return rpc_error(grpc.StatusCode.UNAVAILABLE, details)


def _code(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code().name
    return type(error).__name__


class ShardedRecall:
    """The recall stub's ``Recall`` and ``GetCatalog`` over ``shards`` (one stub per shard, in
    shard order). ``registry`` adds ``recsys_recall_shard_failures_total{shard,code}``."""

    def __init__(
        self, shards: Sequence[recall_pb2_grpc.RecallServiceStub], registry: CollectorRegistry | None = None
    ):
        if not shards:
            raise ValueError("ShardedRecall needs at least one shard")
        self.shards = list(shards)
        self.failures: Counter | None = None
        if registry is not None:
            self.failures = get_or_create(
                registry,
                "recsys_recall_shard_failures",
                lambda: Counter(
                    "recsys_recall_shard_failures",
                    "Recall calls a shard failed (its items were left out of the merged answer)",
                    ["shard", "code"],
                    registry=registry,
                ),
            )

    @classmethod
    def connect(cls, channels: Sequence[grpc.aio.Channel], registry: CollectorRegistry | None = None):
        """Over one channel per shard, in shard order."""
        return cls([recall_pb2_grpc.RecallServiceStub(channel) for channel in channels], registry)

    def _failed(self, shard: int, error: BaseException) -> None:
        code = _code(error)
        log.warning("recall shard %d failed: %s", shard, code, extra={"shard": shard, "code": code})
        if self.failures is not None:
            self.failures.labels(str(shard), code).inc()

    async def Recall(
        self, request: recall_pb2.RecallRequest, timeout: float | None = None, metadata: Any = None
    ) -> recall_pb2.RecallResponse:
        """Every shard's source lists under one ``timeout``, merged as one recall would merge them."""
        shard_request = recall_pb2.RecallRequest()
        shard_request.CopyFrom(request)
        shard_request.source_lists = True
        answers = await asyncio.gather(
            *(shard.Recall(shard_request, timeout=timeout, metadata=metadata) for shard in self.shards),
            return_exceptions=True,
        )
        parts, versions, shard_ids, errors = [], [], [], []
        for position, answer in enumerate(answers):
            if isinstance(answer, asyncio.CancelledError):
                raise answer
            if isinstance(answer, BaseException):
                errors.append(answer)
                self._failed(position, answer)
                continue
            try:
                if answer.catalog != request.catalog:
                    raise ValueError("answered for another catalog")
                parts.append(source_lists_from_response(answer, request.k))
            except (ValueError, InvalidArgument) as error:
                errors.append(error)
                self._failed(position, error)
                continue
            versions.append(answer.model_version)
            shard_ids.append((answer.shard_index, max(answer.shard_count, 1)))
        if not parts:
            rpc_errors = [e for e in errors if isinstance(e, grpc.aio.AioRpcError)]
            # A shard's own status (deadline, catalog mismatch, ...) tells the pipeline what happened.
            mismatch = [e for e in rpc_errors if e.code() == grpc.StatusCode.FAILED_PRECONDITION]
            if mismatch or rpc_errors:
                raise (mismatch or rpc_errors)[0]
            raise unavailable(f"no recall shard answered ({len(self.shards)} asked): {errors[0]}")
        response = candidates_response(merge_shards(parts), request.catalog, "+".join(sorted(set(versions))))
        if errors:
            response.degraded_reasons.append(SHARD_UNAVAILABLE)
        expected = len(self.shards)
        if len(set(shard_ids)) < len(shard_ids) or any(count != expected for _, count in shard_ids):
            log.warning("recall shards misconfigured: %s answered, %d expected", sorted(shard_ids), expected)
            response.degraded_reasons.append(SHARD_MISCONFIGURED)
        return response

    async def UserProfile(
        self, request: recall_pb2.UserProfileRequest, timeout: float | None = None, metadata: Any = None
    ) -> recall_pb2.UserProfileResponse:
        """The nearest attribute clusters from the first shard that answers (every shard holds
        the whole catalog's centroids), all shards tried in turn within the one ``timeout``; a
        shard's answer about the request itself (another catalog, a bad field, no time left) ends
        the search."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        final = (
            grpc.StatusCode.FAILED_PRECONDITION,
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
        last_error: grpc.aio.AioRpcError | None = None
        for position, shard in enumerate(self.shards):
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                break
            try:
                return await shard.UserProfile(request, timeout=remaining, metadata=metadata)
            except grpc.aio.AioRpcError as error:
                self._failed(position, error)
                if error.code() in final:
                    raise
                last_error = error
        raise last_error or unavailable(f"no recall shard answered ({len(self.shards)} asked)")

    async def GetCatalog(
        self,
        request: recall_pb2.CatalogRequest,
        timeout: float | None = None,
        metadata: Any = None,
        wait_for_ready: bool | None = None,
    ) -> AsyncIterator[recall_pb2.CatalogChunk]:
        """The catalog (every shard serves the same one) from the first shard that streams it.
        Shards that are down fail fast; ``wait_for_ready`` applies to the last one tried."""
        last_error: BaseException | None = None
        last = len(self.shards) - 1
        for position, shard in enumerate(self.shards):
            call = shard.GetCatalog(
                request,
                timeout=timeout,
                metadata=metadata,
                wait_for_ready=wait_for_ready if position == last else None,
            )
            started = False
            try:
                async for chunk in call:
                    started = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as error:
                if started:  # half a catalog cannot be completed from another shard
                    raise
                last_error = error
                self._failed(position, error)
        assert last_error is not None
        raise last_error
