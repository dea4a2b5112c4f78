"""The packed internal wire: arrays of catalog indices and scores inside protobuf ``bytes`` fields.

Internal hops (gateway -> recall, gateway -> rank) never send one message per candidate: each
column is one little-endian array (``int32`` indices, ``float32`` scores, ``uint8`` flags), decoded
with a zero-copy ``np.frombuffer``. Every message also names the catalog its indices refer to by
:func:`catalog_fingerprint`, so two bundles built from different catalogs are never mixed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import grpc
import numpy as np

from recsys.serving.validation import InvalidArgument, StatusError

INDEX = np.dtype("<i4")
SCORE = np.dtype("<f4")
FLAGS = np.dtype("u1")


class CatalogMismatch(StatusError):
    """A message names another catalog than the one this process serves (FAILED_PRECONDITION:
    the caller must fetch the catalog again before its indices mean anything here)."""

    status = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, expected: str, got: str) -> None:
        super().__init__(
            f"catalog: request is for catalog {got[:16]!r}, this bundle serves {expected[:16]!r}"
        )
        self.expected = expected
        self.got = got


def catalog_fingerprint(item_ids: Iterable[str]) -> str:
    """sha256 of the item ids in index order (one per line): equal iff the indices mean the same."""
    return hashlib.sha256("".join(f"{item_id}\n" for item_id in item_ids).encode("utf-8")).hexdigest()


def pack(values: np.ndarray | Sequence[float], dtype: np.dtype) -> bytes:
    """The little-endian bytes of ``values`` as ``dtype``."""
    return np.ascontiguousarray(values, dtype=dtype).tobytes()


def unpack(data: bytes, dtype: np.dtype, field: str, count: int | None = None) -> np.ndarray:
    """A read-only view of ``data`` as ``dtype``; InvalidArgument naming ``field`` when the byte
    length is not a whole number of elements or (given ``count``) not ``count`` elements."""
    size = dtype.itemsize
    if len(data) % size:
        raise InvalidArgument(field, f"{len(data)} bytes is not a whole number of {dtype.name} values")
    values = np.frombuffer(data, dtype=dtype)
    if count is not None and len(values) != count:
        raise InvalidArgument(field, f"must have {count} values, got {len(values)}")
    return values


def unpack_indices(data: bytes, field: str, num_items: int, count: int | None = None) -> np.ndarray:
    """int32 catalog indices, each in ``0..num_items-1`` (else InvalidArgument naming ``field``)."""
    values = unpack(data, INDEX, field, count)
    if len(values) and (int(values.min()) < 0 or int(values.max()) >= num_items):
        bad = values[(values < 0) | (values >= num_items)][0]
        raise InvalidArgument(field, f"catalog index {int(bad)} is outside 0..{num_items - 1}")
    return values


def unpack_scores(data: bytes, field: str, count: int) -> np.ndarray:
    """``count`` finite float32 values (else InvalidArgument naming ``field``)."""
    values = unpack(data, SCORE, field, count)
    if not np.isfinite(values).all():
        raise InvalidArgument(field, "must be finite (NaN or infinity found)")
    return values


def flags_to_mask(flags: np.ndarray, columns: int) -> np.ndarray:
    """bool [n, columns] from one flag byte per row (bit c = column c)."""
    bits = np.left_shift(np.uint8(1), np.arange(columns, dtype=np.uint8))
    return (np.asarray(flags, dtype=np.uint8)[:, None] & bits) != 0


def mask_to_flags(mask: np.ndarray) -> np.ndarray:
    """One flag byte per row of a bool [n, columns] mask (columns <= 8)."""
    mask = np.asarray(mask, dtype=bool)
    bits = np.left_shift(np.uint8(1), np.arange(mask.shape[1], dtype=np.uint8))
    return (mask * bits).sum(axis=1, dtype=np.uint8) if mask.size else np.zeros(len(mask), np.uint8)


def check_catalog(expected: str, got: str) -> None:
    """Raise CatalogMismatch unless ``got`` names the catalog ``expected``."""
    if got != expected:
        raise CatalogMismatch(expected, got)
