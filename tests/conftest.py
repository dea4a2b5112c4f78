"""Session fixtures shared by every test package: tiny synthetic data and tiny bundles built in a
temporary folder (never committed, never in artifacts/), and the shared Beauty folder."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

BEAUTY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon-beauty"


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    """The shared Amazon Beauty folder; tests using it skip when it is absent."""
    if not (BEAUTY_DIR / "Beauty.txt").is_file():
        pytest.skip(f"Amazon Beauty data not found at {BEAUTY_DIR} (../shared/data/amazon-beauty)")
    return BEAUTY_DIR


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Path]) -> Path:
    """``build(folder)`` once per test session: under pytest-xdist the first worker to ask builds
    into a folder all workers share (a file lock keeps the others waiting, then they read what it
    wrote); without xdist, a temporary folder of this process. Returns what ``build`` returned."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / f"shared-{name}"
    record = shared.with_suffix(".json")
    with FileLock(str(shared) + ".lock"):
        if not record.is_file():  # a worker that failed mid-build left no record: build again
            shutil.rmtree(shared, ignore_errors=True)
            shared.mkdir(parents=True)
            record.write_text(json.dumps({"path": str(build(shared))}))
    return Path(json.loads(record.read_text())["path"])


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded synthetic catalog + interaction log (CSV), generated once per session."""
    from recsys.data.synthetic import SyntheticConfig, generate

    return built_once(tmp_path_factory, "synthetic", lambda folder: generate(folder, SyntheticConfig.tiny()))


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_dir: Path):
    from recsys.data.loaders import load_dataset

    return load_dataset(synthetic_dir)


@pytest.fixture(scope="session")
def recall_bundle(synthetic_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recall bundle trained for seconds on the tiny synthetic data (once per session, shared
    by the xdist workers: tests read it, never write it)."""
    from recall_service.train import RecallTrainConfig, build_bundle

    return built_once(
        tmp_path_factory,
        "recall-bundle",
        lambda folder: build_bundle(synthetic_dataset, folder / "recall-bundle", RecallTrainConfig.tiny()),
    )


@pytest.fixture(scope="session")
def rank_bundle(synthetic_dataset, recall_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank bundle trained for seconds on the tiny recall bundle's candidates (once per session,
    shared by the xdist workers)."""
    from rank_service.train import RankTrainConfig, build_bundle

    return built_once(
        tmp_path_factory,
        "rank-bundle",
        lambda folder: build_bundle(
            synthetic_dataset, recall_bundle, folder / "rank-bundle", RankTrainConfig.tiny()
        ),
    )
