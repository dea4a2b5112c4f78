"""The dataset model every stage shares: interactions in time order plus an item catalog.

Dense ids are positions (0..n-1) in an :class:`IdMap`; they never leave the process. Models that
need a padding id use ``dense + 1`` internally, keeping 0 for padding.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import numpy as np

from recsys.v1 import common_pb2


def _parse_event_type(cls, name: str | int) -> EventType:
    """Parse ``"purchase"``, ``"ADD_TO_CART"``, ``"add-to-cart"`` or an int value."""
    if isinstance(name, int | np.integer):
        return cls(int(name))
    key = str(name).strip().upper().replace("-", "_").replace(" ", "_")
    if key.isdigit():
        return cls(int(key))
    return cls[key]


# The event types of the wire contract (``recsys.v1.EventType`` in protos/recsys/v1/common.proto),
# read from the generated enum so there is one list; ``EVENT_TYPE_UNSPECIFIED`` is ``UNSPECIFIED``
# here and read as VIEW.
EventType = IntEnum(
    "EventType",
    {name.removeprefix("EVENT_TYPE_"): value for name, value in common_pb2.EventType.items()},
    module=__name__,
)
EventType.parse = classmethod(_parse_event_type)  # type: ignore[attr-defined]


# Scenarios every bundle knows, in a fixed order (their dense ids). Datasets may add more.
DEFAULT_SCENARIOS: tuple[str, ...] = ("home", "item_detail", "cart", "category", "ads")


class IdMap:
    """External string id <-> dense int id (the position in ``ids``)."""

    def __init__(self, ids: Iterable[str]):
        self.ids: list[str] = [str(i) for i in ids]
        self._index: dict[str, int] = {external: dense for dense, external in enumerate(self.ids)}
        if len(self._index) != len(self.ids):
            raise ValueError("IdMap ids must be unique")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, external_id: object) -> bool:
        return external_id in self._index

    def dense(self, external_id: str) -> int:
        """Dense id of ``external_id``, or -1 when unknown."""
        return self._index.get(external_id, -1)

    def dense_many(self, external_ids: Sequence[str]) -> np.ndarray:
        """Dense ids (int64) of many external ids, -1 for unknown ones."""
        return np.fromiter(
            (self._index.get(e, -1) for e in external_ids), dtype=np.int64, count=len(external_ids)
        )

    def external(self, dense_id: int) -> str:
        return self.ids[int(dense_id)]

    def external_many(self, dense_ids: Iterable[int]) -> list[str]:
        return [self.ids[int(d)] for d in dense_ids]

    def save(self, path: str | Path) -> None:
        """Write one id per line (line number = dense id)."""
        Path(path).write_text("".join(f"{e}\n" for e in self.ids), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> IdMap:
        text = Path(path).read_text(encoding="utf-8")
        return cls(text.splitlines())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and self.ids == other.ids


@dataclass
class ItemCatalog:
    """Item attributes, indexed by dense item id.

    ``attributes[i]`` is a bag of dense attribute ids (into ``attribute_names``; Beauty's
    brand/category ids, or typed ``category=..``/``brand=..``/``price=..`` tokens built from the
    columns below). ``category``/``brand`` are dense ids into their name lists, -1 when unknown.
    """

    attributes: list[np.ndarray]
    attribute_names: list[str] = field(default_factory=list)
    category: np.ndarray | None = None
    category_names: list[str] = field(default_factory=list)
    brand: np.ndarray | None = None
    brand_names: list[str] = field(default_factory=list)
    price: np.ndarray | None = None  # float32, NaN when unknown
    title: list[str] | None = None
    bid: np.ndarray | None = None  # float32 sponsored bid per item, 0 when not sponsored


@dataclass
class Dataset:
    """Users' interaction sequences (oldest first) over a catalog of items.

    ``sequences[u]`` holds dense item ids; ``event_types[u]``/``scenarios[u]``/``timestamps[u]``
    (when present) are aligned with it. ``scenarios`` index into ``scenario_names``.
    """

    name: str
    users: IdMap
    items: IdMap
    sequences: list[np.ndarray]
    catalog: ItemCatalog
    event_types: list[np.ndarray] | None = None
    scenarios: list[np.ndarray] | None = None
    timestamps: list[np.ndarray] | None = None
    scenario_names: list[str] = field(default_factory=lambda: list(DEFAULT_SCENARIOS))

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_items(self) -> int:
        return len(self.items)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def events_of(self, user: int) -> np.ndarray:
        """Event types of a user's sequence; all VIEW when the data has none."""
        if self.event_types is None:
            return np.full(len(self.sequences[user]), EventType.VIEW, dtype=np.int8)
        return self.event_types[user]

    def fingerprint(self) -> str:
        """Stable hash of ids and sequences: recorded in bundle manifests."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.num_users, self.num_items]).encode())
        for ids in (self.users.ids, self.items.ids):
            digest.update("\n".join(ids).encode())
        for sequence in self.sequences:
            digest.update(np.asarray(sequence, dtype=np.int64).tobytes())
            digest.update(b"|")
        return digest.hexdigest()[:16]

    def summary(self) -> dict:
        """Counts for eval JSON and logs."""
        return {
            "name": self.name,
            "users": self.num_users,
            "items": self.num_items,
            "interactions": self.num_interactions,
            "attributes": len(self.catalog.attribute_names),
            "fingerprint": self.fingerprint(),
        }
