"""Rank service configuration: its own defaults on the shared model-serving config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rank_service.config import RankConfig
from recsys.serving.config import ConfigError, ServingConfig


def test_rank_defaults_then_env_then_flags(rank_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECSYS_BUNDLE", str(rank_bundle))
    config = RankConfig.from_args([])
    assert (config.serving.port, config.serving.metrics_port) == (50052, 9092)
    assert (config.max_batch, config.max_wait_ms, config.threads, config.device) == (16, 0.0, 1, "auto")
    monkeypatch.setenv("RECSYS_MAX_BATCH", "4")
    assert RankConfig.from_args([]).max_batch == 4
    assert RankConfig.from_args(["--max-batch", "9"]).max_batch == 9


def test_a_missing_rank_bundle_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^bundle: no rank bundle"):
        RankConfig(serving=ServingConfig(), bundle=tmp_path / "nothing")


def test_serve_rank_with_a_missing_bundle_exits_2_with_the_reason(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "rank_service", "--bundle", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "bundle: no rank bundle" in done.stderr
