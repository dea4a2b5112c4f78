"""Typed configuration of the recall service, read once from RECSYS_* env vars and flags."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from recsys.serving.config import ConfigError, ModelServingConfig, add_env_arguments

MAX_SHARDS = 1024
_POD_ORDINAL = re.compile(r"-(\d+)$")


def pod_ordinal(hostname: str) -> int | None:
    """The StatefulSet pod ordinal in a hostname (``recall-2`` -> 2); None without one."""
    match = _POD_ORDINAL.search(hostname)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class RecallConfig(ModelServingConfig):
    """Serving settings plus the recall bundle, device, micro-batching, sharding and live ANN
    quality knobs."""

    max_batch: int = 64
    max_wait_ms: float = 0.0
    threads: int = 1  # compute threads of Faiss and ONNX Runtime (1 fits a host shared by 3 services)
    # Sharded recall: this server recalls from item range recall_shard_index of recall_shards
    # (recsys.recall_merge.shard_range) and still serves the whole catalog.
    recall_shards: int = 1
    recall_shard_index: int = 0
    # Share of u2i queries checked against exact search off the request path (0 = off).
    ann_quality_sample: float = 0.01
    ann_quality_window: int = 200  # recall@k gauge = mean over this many latest samples

    component: ClassVar[str] = "recall"
    default_port: ClassVar[int] = 50051
    default_metrics_port: ClassVar[int] = 9091

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.recall_shards <= MAX_SHARDS:
            raise ConfigError(f"recall_shards: must be in 1..{MAX_SHARDS}, got {self.recall_shards}")
        if not 0 <= self.recall_shard_index < self.recall_shards:
            raise ConfigError(
                f"recall_shard_index: must be in 0..{self.recall_shards - 1}, got {self.recall_shard_index}"
            )
        if not 0.0 <= self.ann_quality_sample <= 1.0:  # also rejects NaN
            raise ConfigError(f"ann_quality_sample: must be in 0..1, got {self.ann_quality_sample}")
        if not 1 <= self.ann_quality_window <= 100_000:
            raise ConfigError(f"ann_quality_window: must be in 1..100000, got {self.ann_quality_window}")

    @property
    def shard(self) -> tuple[int, int] | None:
        """(index, count) when sharded, else None."""
        return (self.recall_shard_index, self.recall_shards) if self.recall_shards > 1 else None

    @classmethod
    def build_parser(cls) -> argparse.ArgumentParser:
        """The model-serving flags plus sharding and live ANN quality, each defaulting to its
        RECSYS_* variable. The shard index defaults to RECSYS_RECALL_SHARD_INDEX, else to the
        StatefulSet pod ordinal (the trailing ``-<n>`` of HOSTNAME)."""
        parser = super().build_parser()
        group = parser.add_argument_group("recall sharding and live ANN quality")
        try:
            settings: list[tuple[str, type, object, str]] = [
                ("recall_shards", int, cls.recall_shards, "recall shards; each owns 1/N of the items"),
                (
                    "recall_shard_index",
                    int,
                    None,
                    "this server's shard, 0-based (unset: the StatefulSet pod ordinal, the trailing "
                    "-N of HOSTNAME)",
                ),
                (
                    "ann_quality_sample",
                    float,
                    cls.ann_quality_sample,
                    "share of u2i queries checked against exact search off the request path (0 = off)",
                ),
                (
                    "ann_quality_window",
                    int,
                    cls.ann_quality_window,
                    "live recall@k is the mean over this many latest samples",
                ),
            ]
            add_env_arguments(group, settings)
        except ConfigError as error:
            parser.error(str(error))
        return parser

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> RecallConfig:
        """Parse flags (defaulting to env vars, then built-in defaults); raises ConfigError when invalid."""
        argv = None if argv is None else list(argv)
        args = cls.build_parser().parse_args(argv)
        if args.recall_shard_index is None:  # unsharded: 0; sharded: the pod ordinal
            hostname = os.environ.get("HOSTNAME", "")
            args.recall_shard_index = 0 if args.recall_shards == 1 else pod_ordinal(hostname)
            if args.recall_shard_index is None:
                raise ConfigError(
                    f"recall_shard_index: unset, and HOSTNAME {hostname!r} ends in no pod ordinal (-N); "
                    "set RECSYS_RECALL_SHARD_INDEX or --recall-shard-index"
                )
        return dataclasses.replace(
            super().from_args(argv),
            recall_shards=args.recall_shards,
            recall_shard_index=args.recall_shard_index,
            ann_quality_sample=args.ann_quality_sample,
            ann_quality_window=args.ann_quality_window,
        )


def from_args(argv: list[str] | None = None) -> RecallConfig:
    """Parse flags (defaulting to env vars, then built-in defaults); raises ConfigError when invalid."""
    return RecallConfig.from_args(argv)
