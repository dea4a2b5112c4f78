"""Recall service configuration: env vars, flags overriding them, and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from recall_service.config import RecallConfig, from_args
from recsys.serving.config import ConfigError, ServingConfig


def test_env_vars_then_flags(recall_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_BUNDLE", str(recall_bundle))
    monkeypatch.setenv("RECSYS_MAX_BATCH", "8")
    monkeypatch.setenv("RECSYS_THREADS", "2")
    monkeypatch.setenv("RECSYS_DEVICE", "cpu")
    config = from_args(["--max-wait-ms", "5"])
    assert config.bundle == recall_bundle
    assert (config.max_batch, config.max_wait_ms, config.threads, config.device) == (8, 5.0, 2, "cpu")
    assert (config.serving.port, config.serving.metrics_port) == (50051, 9091)
    assert from_args(["--max-batch", "3", "--port", "0"]).max_batch == 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_wait_ms": -1.0}, "max_wait_ms"),
        ({"threads": 0}, "threads"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_invalid_settings_name_the_field(recall_bundle: Path, overrides: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"^{field}:"):
        RecallConfig(serving=ServingConfig(), bundle=recall_bundle, **overrides)


def test_a_missing_bundle_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^bundle:"):
        RecallConfig(serving=ServingConfig(), bundle=tmp_path / "nothing")
