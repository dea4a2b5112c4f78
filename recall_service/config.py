"""Typed configuration of the recall service, read once from RECSYS_* env vars and flags."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from recsys.serving.config import ModelServingConfig


@dataclass(frozen=True)
class RecallConfig(ModelServingConfig):
    """Serving settings plus the recall bundle, device and micro-batching knobs."""

    max_batch: int = 64
    max_wait_ms: float = 0.0
    threads: int = 1  # compute threads of Faiss and ONNX Runtime (1 fits a host shared by 3 services)

    component: ClassVar[str] = "recall"
    default_port: ClassVar[int] = 50051
    default_metrics_port: ClassVar[int] = 9091


def from_args(argv: list[str] | None = None) -> RecallConfig:
    """Parse flags (defaulting to env vars, then built-in defaults); raises ConfigError when invalid."""
    return RecallConfig.from_args(argv)
