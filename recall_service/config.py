"""Typed configuration of the recall service, read once from RECSYS_* env vars and flags."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from recsys.bundle import MANIFEST
from recsys.serving.config import (
    ConfigError,
    ServingConfig,
    add_serving_arguments,
    env_default,
    serving_config_from_args,
)

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9091
DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class RecallConfig:
    """Serving settings plus the bundle, device and micro-batching knobs."""

    serving: ServingConfig
    bundle: Path
    device: str = "auto"
    max_batch: int = 64
    max_wait_ms: float = 2.0
    threads: int = 1  # compute threads of Faiss and ONNX Runtime

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError(f"max_batch: must be in 1..4096, got {self.max_batch}")
        if not 0.0 <= self.max_wait_ms <= 1000.0:
            raise ConfigError(f"max_wait_ms: must be in 0..1000, got {self.max_wait_ms}")
        if not 1 <= self.threads <= 256:
            raise ConfigError(f"threads: must be in 1..256, got {self.threads}")
        if not (Path(self.bundle) / MANIFEST).is_file():
            raise ConfigError(
                f"bundle: no recall bundle at {self.bundle} (build it with `recsys train recall`)"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys serve recall", description="Serve the recall stage over gRPC."
    )
    add_serving_arguments(parser, DEFAULT_PORT, DEFAULT_METRICS_PORT)
    group = parser.add_argument_group("recall (flags override RECSYS_* environment variables)")
    try:
        defaults = {
            "bundle": env_default("RECSYS_BUNDLE", Path("artifacts/synthetic/recall"), Path),
            "device": env_default("RECSYS_DEVICE", "auto"),
            "max_batch": env_default("RECSYS_MAX_BATCH", 64, int),
            "max_wait_ms": env_default("RECSYS_MAX_WAIT_MS", 2.0, float),
            "threads": env_default("RECSYS_THREADS", 1, int),
        }
    except ConfigError as error:
        parser.error(str(error))
    group.add_argument(
        "--bundle",
        type=Path,
        default=defaults["bundle"],
        help=f"recall bundle folder (env RECSYS_BUNDLE; now {defaults['bundle']})",
    )
    group.add_argument(
        "--device",
        choices=DEVICES,
        default=defaults["device"],
        help=f"where the index and user tower run (env RECSYS_DEVICE; now {defaults['device']})",
    )
    group.add_argument(
        "--max-batch",
        type=int,
        default=defaults["max_batch"],
        help=f"most requests per engine call (env RECSYS_MAX_BATCH; now {defaults['max_batch']})",
    )
    group.add_argument(
        "--max-wait-ms",
        type=float,
        default=defaults["max_wait_ms"],
        help=f"longest a request waits for a batch (env RECSYS_MAX_WAIT_MS; now {defaults['max_wait_ms']})",
    )
    group.add_argument(
        "--threads",
        type=int,
        default=defaults["threads"],
        help=f"Faiss/ONNX Runtime threads (env RECSYS_THREADS; now {defaults['threads']})",
    )
    return parser


def from_args(argv: list[str] | None = None) -> RecallConfig:
    """Parse flags (defaulting to env vars, then built-in defaults); raises ConfigError when invalid."""
    args = build_parser().parse_args(argv)
    return RecallConfig(
        serving=serving_config_from_args(args),
        bundle=args.bundle,
        device=args.device,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        threads=args.threads,
    )
