"""The recall sources: one definition that recall, rank, the gateway and the wire all use.

The order is the column order of every ``source_scores`` matrix and the bit order of every
``source_flags`` byte.
"""

from __future__ import annotations

RECALL_SOURCES: tuple[str, ...] = ("u2i", "i2i", "covisit", "popular")
SOURCE_INDEX: dict[str, int] = {name: position for position, name in enumerate(RECALL_SOURCES)}
