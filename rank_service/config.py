"""Rank service configuration: the common serving settings plus bundle, device and batching."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from recsys.serving.config import (
    ConfigError,
    ServingConfig,
    add_serving_arguments,
    env_default,
    serving_config_from_args,
)

DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9092
DEFAULT_BUNDLE = Path("artifacts/synthetic/rank")
DEVICES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class RankConfig:
    """Everything `recsys serve rank` needs, read once from env vars and flags."""

    serving: ServingConfig
    bundle: Path = DEFAULT_BUNDLE
    device: str = "auto"
    max_batch: int = 16  # requests per model run
    max_wait_ms: float = 1.0  # how long a request may wait for others to join its batch
    threads: int = 2  # ONNX Runtime intra-op threads

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not 1 <= self.max_batch <= 1024:
            raise ConfigError(f"max_batch: must be in 1..1024, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise ConfigError(f"max_wait_ms: must be in 0..1000, got {self.max_wait_ms}")
        if not 1 <= self.threads <= 256:
            raise ConfigError(f"threads: must be in 1..256, got {self.threads}")

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> RankConfig:
        """Parse flags (each defaulting to its RECSYS_* variable); exits with usage on bad values."""
        parser = argparse.ArgumentParser(prog="recsys serve rank", description="Serve the rank bundle")
        add_serving_arguments(parser, DEFAULT_PORT, DEFAULT_METRICS_PORT)
        group = parser.add_argument_group("rank (flags override RECSYS_* environment variables)")
        try:
            group.add_argument(
                "--bundle",
                type=Path,
                default=env_default("RECSYS_BUNDLE", DEFAULT_BUNDLE, Path),
                help="rank bundle directory (env RECSYS_BUNDLE)",
            )
            group.add_argument(
                "--device",
                choices=DEVICES,
                default=env_default("RECSYS_DEVICE", "auto"),
                help="ONNX Runtime device (env RECSYS_DEVICE)",
            )
            group.add_argument(
                "--max-batch",
                type=int,
                default=env_default("RECSYS_MAX_BATCH", 16, int),
                help="requests per model run (env RECSYS_MAX_BATCH)",
            )
            group.add_argument(
                "--max-wait-ms",
                type=float,
                default=env_default("RECSYS_MAX_WAIT_MS", 1.0, float),
                help="batching window in ms (env RECSYS_MAX_WAIT_MS)",
            )
            group.add_argument(
                "--threads",
                type=int,
                default=env_default("RECSYS_THREADS", 2, int),
                help="ONNX Runtime intra-op threads (env RECSYS_THREADS)",
            )
        except ConfigError as exc:
            parser.error(str(exc))
        args = parser.parse_args(argv)
        try:
            return cls(
                serving=serving_config_from_args(args),
                bundle=args.bundle,
                device=args.device,
                max_batch=args.max_batch,
                max_wait_ms=args.max_wait_ms,
                threads=args.threads,
            )
        except ConfigError as exc:
            parser.error(str(exc))
            raise  # unreachable: parser.error exits
