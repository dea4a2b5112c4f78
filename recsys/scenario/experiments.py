"""A/B experiments inside a scenario: arms with traffic shares, users bucketed deterministically.

In the scenario file::

    home:
      stages: [...]                       # the control arm's stages
      experiment:
        name: home_rank_2026_12           # reported with every response and in the metrics
        salt: "1"                         # optional; change it to reshuffle users
        arms:
          control: {share: 50}            # no stages: the scenario's own
          recall_only:                    # another pipeline: rank off, other caps, ...
            share: 50
            stages: [{recall: {...}}]

A user's arm is a hash of the experiment's salt and the user id (requests without a user are
bucketed by request id), so it is stable across restarts and replicas and needs no shared state.
Each arm compiles to a :class:`~recsys.scenario.config.Scenario` variant of the same name, checked
like any scenario; the scenario requires the union of its arms' request fields.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from recsys.scenario.config import Scenario

BUCKETS = 10_000


@dataclass(frozen=True)
class Arm:
    """One arm: its name, traffic share and the scenario variant it serves."""

    name: str
    share: float
    scenario: Scenario


@dataclass(frozen=True)
class Experiment:
    """Arms of one scenario, with the salt that buckets users."""

    name: str
    salt: str
    arms: tuple[Arm, ...]

    def bucket(self, key: str) -> int:
        """``key``'s bucket in [0, BUCKETS): a hash of the salt and the key."""
        digest = hashlib.sha256(f"{self.name}\x1f{self.salt}\x1f{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % BUCKETS

    def assign(self, key: str) -> Arm:
        """The arm of ``key`` (a user id, else a request id): shares cut the buckets in order."""
        total = sum(arm.share for arm in self.arms)
        point = self.bucket(key) / BUCKETS * total
        reached = 0.0
        for arm in self.arms:
            reached += arm.share
            if point < reached:
                return arm
        return self.arms[-1]
