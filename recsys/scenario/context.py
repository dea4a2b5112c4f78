"""What flows through a compiled scenario: the request (:class:`RecommendInputs`), the answer
being built (:class:`RecommendResult`) and what each stage may read (:class:`StageContext`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.scenario.candidates import Candidates, History
from recsys.scenario.catalog import Catalog
from recsys.v1 import common_pb2

if TYPE_CHECKING:
    from recsys.scenario.config import Scenario


class PipelineUnavailable(RuntimeError):
    """No downstream answered and there is no fallback to serve."""


class CatalogMismatchError(RuntimeError):
    """A downstream answered (or refused) for another catalog than the pipeline's."""


@dataclass(frozen=True)
class RecommendInputs:
    """What one request brings, already validated (by the gateway's servicer, or built offline)."""

    scenario: Scenario
    user_id: str
    num_items: int
    context_item_ids: tuple[str, ...] = ()
    context_category: str = ""
    history: tuple[common_pb2.HistoryItem, ...] | None = None  # given by a stateless client
    debug: bool = False
    request_id: str = ""


@dataclass
class RecommendResult:
    """What the pipeline served: the final candidates and how it got them."""

    candidates: Candidates
    catalog: Catalog | None = None
    history: History = field(default_factory=History)
    degraded_reasons: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    model_versions: dict[str, str] = field(default_factory=dict)

    @property
    def degraded(self) -> bool:
        return bool(self.degraded_reasons)

    @property
    def model_version(self) -> str:
        return ",".join(f"{kind}={version}" for kind, version in sorted(self.model_versions.items()))

    @property
    def item_ids(self) -> list[str]:
        if self.catalog is None:
            return []
        ids = self.catalog.item_ids
        return [ids[index] for index in self.candidates.items.tolist()]


@dataclass(frozen=True)
class Backends:
    """The recall and rank backends a scenario runs against: gRPC stubs online, in-process
    servicers with the same async methods offline (``recsys.app.inprocess``)."""

    recall: Any  # RecallServiceStub-like: Recall(request, timeout, metadata), GetCatalog(...)
    rank: Any  # RankServiceStub-like: Rank(request, timeout, metadata)


@dataclass
class StageContext:
    """Everything a stage may read while it runs one request."""

    inputs: RecommendInputs
    catalog: Catalog
    history: History
    context_items: np.ndarray  # int32 catalog indices of context.item_ids, -1 = unknown
    category: int  # catalog index of context.category, -1 = none asked
    deadline: float  # time.monotonic() instant
    result: RecommendResult
    backends: Backends
    fallback_depth: int = 1000
    on_catalog_mismatch: Callable[[], None] = lambda: None
