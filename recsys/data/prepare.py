"""Turn a ``--data`` argument (``synthetic`` or a path) into a loaded Dataset.

``synthetic`` is generated once into ``artifacts/synthetic/data`` (quick or default preset) and
then reused as it is, so bundles trained on it stay valid; delete that folder (or run
``recsys data generate``) to change it. Anything else is a path handed to ``load_dataset``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from recsys.data.dataset import Dataset
from recsys.data.loaders import load_dataset
from recsys.data.synthetic import INTERACTIONS_FILE, SyntheticConfig, generate, read_generator_config

SYNTHETIC = "synthetic"

log = logging.getLogger(__name__)


def dataset_artifacts(dataset: Dataset, artifacts: Path) -> Path:
    """``artifacts/<dataset.name>``: where everything built from ``dataset`` goes."""
    return Path(artifacts) / dataset.name


def synthetic_config(quick: bool = False) -> SyntheticConfig:
    """The generator settings ``prepare_dataset("synthetic", ...)`` uses."""
    return SyntheticConfig.quick() if quick else SyntheticConfig.default()


def prepare_dataset(data: str | Path, artifacts: Path, quick: bool = False, progress: bool = True) -> Dataset:
    """Load ``data``: ``"synthetic"`` (generated into ``artifacts/synthetic/data`` when missing,
    quick preset when ``quick``, else default) or a path for ``load_dataset``. ``progress`` shows
    a progress bar on stderr while generating."""
    if str(data) != SYNTHETIC:
        return load_dataset(Path(data))
    data_dir = Path(artifacts) / SYNTHETIC / "data"
    wanted = synthetic_config(quick)
    if not (data_dir / INTERACTIONS_FILE).is_file():
        log.info(
            "generating synthetic data (%d users, %d items) into %s",
            wanted.num_users,
            wanted.num_items,
            data_dir,
        )
        generate(data_dir, wanted, progress=progress)
    else:
        existing = read_generator_config(data_dir)
        if existing != wanted:
            described = (
                f"{existing.num_users} users, {existing.num_items} items" if existing else "unknown settings"
            )
            log.warning(
                "reusing synthetic data in %s (%s), not the %s preset asked for; "
                "delete the folder to regenerate",
                data_dir,
                described,
                "quick" if quick else "default",
            )
    return load_dataset(data_dir, name=SYNTHETIC)
