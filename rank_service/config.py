"""Rank service configuration: the common serving settings plus bundle, device and batching."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from recsys.serving.config import ModelServingConfig


@dataclass(frozen=True)
class RankConfig(ModelServingConfig):
    """Everything `recsys serve rank` needs, read once from env vars and flags."""

    max_batch: int = 16  # requests per model run
    max_wait_ms: float = 0.0
    threads: int = 1  # ONNX Runtime intra-op threads (1 fits a host shared by 3 services)

    component: ClassVar[str] = "rank"
    default_port: ClassVar[int] = 50052
    default_metrics_port: ClassVar[int] = 9092
