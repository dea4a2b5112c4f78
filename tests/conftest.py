"""Session fixtures shared by every test package: tiny synthetic data and tiny bundles built in a
temporary folder (never committed, never in artifacts/), and the shared Beauty folder."""

from __future__ import annotations

from pathlib import Path

import pytest

BEAUTY_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon-beauty"


@pytest.fixture(scope="session")
def beauty_dir() -> Path:
    """The shared Amazon Beauty folder; tests using it skip when it is absent."""
    if not (BEAUTY_DIR / "Beauty.txt").is_file():
        pytest.skip(f"Amazon Beauty data not found at {BEAUTY_DIR} (../shared/data/amazon-beauty)")
    return BEAUTY_DIR


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny seeded synthetic catalog + interaction log (CSV), generated once per session."""
    from recsys.data.synthetic import SyntheticConfig, generate

    return generate(tmp_path_factory.mktemp("synthetic"), SyntheticConfig.tiny())


@pytest.fixture(scope="session")
def synthetic_dataset(synthetic_dir: Path):
    from recsys.data.loaders import load_dataset

    return load_dataset(synthetic_dir)


@pytest.fixture(scope="session")
def recall_bundle(synthetic_dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recall bundle trained for seconds on the tiny synthetic data."""
    from recall_service.train import RecallTrainConfig, build_bundle

    return build_bundle(synthetic_dataset, tmp_path_factory.mktemp("recall-bundle"), RecallTrainConfig.tiny())


@pytest.fixture(scope="session")
def rank_bundle(synthetic_dataset, recall_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank bundle trained for seconds on the tiny recall bundle's candidates."""
    from rank_service.train import RankTrainConfig, build_bundle

    return build_bundle(
        synthetic_dataset, recall_bundle, tmp_path_factory.mktemp("rank-bundle"), RankTrainConfig.tiny()
    )
