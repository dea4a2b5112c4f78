"""The gateway's copy of the catalog: external item ids <-> the indices the internal wire carries.

Recall serves it (``RecallService.GetCatalog``, streamed in chunks); the gateway keeps one
:class:`Catalog` and refreshes it when recall reports another fingerprint. It also gives the
re-rank rules their attributes (category, brand, bid) and the fallback its popularity order, so
no per-candidate attribute ever travels on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from recsys.serving.wire import INDEX, SCORE, catalog_fingerprint, unpack
from recsys.v1 import recall_pb2, recall_pb2_grpc


class CatalogError(RuntimeError):
    """Recall sent a catalog that does not hold together (sizes, order or fingerprint)."""


@dataclass
class Catalog:
    """Item ids and attributes in catalog index order."""

    fingerprint: str
    version: str
    item_ids: list[str]
    item_category: np.ndarray  # int32, index into category_names, -1 = none
    item_brand: np.ndarray  # int32, index into brand_names, -1 = none
    item_bid: np.ndarray  # float32, 0 = not sponsored
    category_names: list[str]
    brand_names: list[str]
    popular: np.ndarray  # int32 item indices, most popular first
    # int32 training interactions per item; empty when recall does not send them (exploration off)
    item_interactions: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __post_init__(self) -> None:
        self.index: dict[str, int] = {item_id: position for position, item_id in enumerate(self.item_ids)}
        self.category_index: dict[str, int] = {
            name: position for position, name in enumerate(self.category_names)
        }

    def __len__(self) -> int:
        return len(self.item_ids)

    def indices(self, item_ids: Sequence[str]) -> np.ndarray:
        """int32 catalog indices of ``item_ids``, -1 for ids the catalog does not know."""
        get = self.index.get
        return np.fromiter((get(item_id, -1) for item_id in item_ids), dtype=np.int32, count=len(item_ids))

    def category_of(self, name: str) -> int:
        """Index of category ``name``; -1 when unknown."""
        return self.category_index.get(name, -1)

    @classmethod
    def from_chunks(cls, chunks: Sequence[recall_pb2.CatalogChunk]) -> Catalog:
        """Assemble streamed chunks; raises CatalogError when they do not add up to the fingerprint."""
        if not chunks:
            raise CatalogError("recall sent no catalog")
        first = chunks[0]
        item_ids: list[str] = []
        categories, brands, bids, popular, interactions = [], [], [], [], []
        for chunk in chunks:
            if chunk.catalog != first.catalog or chunk.offset != len(item_ids):
                raise CatalogError("catalog chunks out of order or from two catalogs")
            count = len(chunk.item_ids)
            item_ids.extend(chunk.item_ids)
            categories.append(unpack(chunk.item_categories, INDEX, "item_categories", count))
            brands.append(unpack(chunk.item_brands, INDEX, "item_brands", count))
            bids.append(unpack(chunk.item_bids, SCORE, "item_bids", count))
            popular.append(unpack(chunk.popular_items, INDEX, "popular_items"))
            if chunk.item_interactions:
                interactions.append(unpack(chunk.item_interactions, INDEX, "item_interactions", count))
        if len(item_ids) != first.num_items:
            raise CatalogError(f"catalog has {len(item_ids)} items, recall announced {first.num_items}")
        if catalog_fingerprint(item_ids) != first.catalog:
            raise CatalogError("catalog ids do not match their fingerprint")
        return cls(
            fingerprint=first.catalog,
            version=first.model_version,
            item_ids=item_ids,
            item_category=np.concatenate(categories).astype(np.int32),
            item_brand=np.concatenate(brands).astype(np.int32),
            item_bid=np.concatenate(bids).astype(np.float32),
            category_names=list(first.category_names),
            brand_names=list(first.brand_names),
            popular=np.concatenate(popular).astype(np.int32),
            item_interactions=np.concatenate(interactions).astype(np.int32)
            if len(interactions) == len(chunks)
            else np.zeros(0, np.int32),
        )


async def fetch_catalog(
    recall: recall_pb2_grpc.RecallServiceStub, known: Catalog | None, timeout_s: float
) -> Catalog:
    """The catalog recall serves now (``known`` itself when unchanged); raises on RPC failure."""
    chunks = []
    call = recall.GetCatalog(
        recall_pb2.CatalogRequest(known_catalog=known.fingerprint if known else ""),
        timeout=timeout_s,
        wait_for_ready=True,  # at start-up recall may still be coming up
    )
    async for chunk in call:
        if chunk.unchanged and known is not None:
            return known
        chunks.append(chunk)
    return Catalog.from_chunks(chunks)
