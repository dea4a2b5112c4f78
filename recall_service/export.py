"""`recsys export recall`: write the recall bundle serving loads (no torch at serving time).

Bundle files: ``user_tower.onnx`` (dynamic batch and sequence axes), ``item_vectors.npy``,
``index.faiss``, ``items.txt`` (id map), co-visitation and popularity tables, item attributes
(category, brand, sponsored bid) and ``manifest.json`` (version, dims, index type, metric, data
fingerprint, training and validation numbers, default source mix per scenario).

Co-visitation and popularity are counted over every interaction except each user's test item
(the convention of ``LeaveOneOutSplit.item_counts_without_test``); the user tower itself is
trained on training sequences only.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from recall_service.index import (
    INDEX_FILE,
    TUNE_K,
    TUNE_MIN_ITEMS,
    TUNE_TARGET_RECALL,
    build_index,
    default_index_factory,
    tune_index,
)
from recall_service.sources import interaction_tables
from recsys.bundle import new_version, write_manifest
from recsys.data.dataset import Dataset
from recsys.data.split import LeaveOneOutSplit
from recsys.training import quiet_exporter_logs, resolve_threads

if TYPE_CHECKING:
    from recall_service.model import TowerEnsemble, TwoTowerModel
    from recall_service.train import RecallTrainConfig

log = logging.getLogger(__name__)

BUNDLE_KIND = "recall"
ONNX_FILE = "user_tower.onnx"
ONNX_OPSET = 18


def export_user_tower(model: TwoTowerModel | TowerEnsemble, path: Path) -> None:
    """Export the user tower to ONNX with dynamic batch and sequence axes (dynamo exporter)."""
    import torch

    from recall_service.model import UserTowerForExport

    quiet_exporter_logs()
    tower = UserTowerForExport(model).eval()
    batch, length = 3, 5
    items = torch.randint(1, model.shape.num_items + 1, (batch, length))
    items[0, :2] = 0  # left padding, so the traced graph never assumes full rows
    events = torch.ones_like(items)
    scenario = torch.zeros(batch, dtype=torch.long)
    batch_dim = torch.export.Dim("batch", min=1, max=65536)
    length_dim = torch.export.Dim("length", min=1, max=4096)
    # The text part (if any) is read from a precomputed table: the graph gathers rows of it.
    with torch.no_grad(), warnings.catch_warnings(), model.frozen_text():
        # The exporter warns that each named axis is shared by two inputs: that is intended.
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(
            tower,
            (items, events, scenario),
            dynamo=True,
            opset_version=ONNX_OPSET,
            input_names=["items", "events", "scenario"],
            output_names=["user_vectors"],
            dynamic_shapes={
                "items": {0: batch_dim, 1: length_dim},
                "events": {0: batch_dim, 1: length_dim},
                "scenario": {0: batch_dim},
            },
            verbose=False,
        )
    program.save(str(path), external_data=False)


TABLES_EXCLUDE_TEST = "each user's test item"  # the manifest's word for what the tables did not count


def covisit_settings(config: RecallTrainConfig) -> dict[str, float]:
    """The co-visitation settings the manifest records (and tables are rebuilt from)."""
    return {
        "window": config.covisit_window,
        "backward_weight": config.covisit_backward_weight,
        "popularity_exponent": config.covisit_popularity_exponent,
        "neighbours": config.covisit_neighbours,
        "recent_items": config.covisit_recent_items,
        "recency_decay": config.covisit_recency_decay,
    }


def holdout_sequences(dataset: Dataset) -> list[np.ndarray]:
    """Every user's sequence without its test item (users too short to evaluate keep everything)."""
    split = LeaveOneOutSplit(dataset)
    evaluated = np.zeros(dataset.num_users, dtype=bool)
    evaluated[split.eval_users] = True
    return [
        np.asarray(
            split.history(user, "test") if evaluated[user] else dataset.sequences[user], dtype=np.int64
        )
        for user in range(dataset.num_users)
    ]


def _item_text_manifest(model: TwoTowerModel | TowerEnsemble) -> dict:
    """The manifest's ``item_text`` block; nothing for a model without text (unchanged manifest)."""
    shape = model.shape
    if shape.text == "off" and not shape.mask_unseen_ids:
        return {}
    return {
        "item_text": {
            "mode": shape.text,
            "buckets": shape.text_buckets,
            "input_dim": shape.text_input_dim,
            "unseen_items": "cold" if shape.mask_unseen_ids else "keep",
            "note": "the text part is inside item_vectors.npy and the ONNX graph; serving needs nothing new",
        }
    }


def user_vector_note(model: TwoTowerModel | TowerEnsemble) -> str:
    """What the manifest says of the graph's user vectors (an ensemble's are its members' side by
    side: each member's part is normalised, not the whole)."""
    from recall_service.model import tower_members

    if not model.normalised:
        return " (raw inner product with item vectors)"
    return " (each member's part L2-normalised)" if len(tower_members(model)) > 1 else " L2-normalised"


def _names_or_empty(names: list[str]) -> str:
    return "".join(f"{name}\n" for name in names)


def export_bundle(
    model: TwoTowerModel | TowerEnsemble,
    dataset: Dataset,
    bundle_dir: Path,
    config: RecallTrainConfig,
    train_info: dict | None = None,
    tune_min_items: int = TUNE_MIN_ITEMS,
    tune_k: int = TUNE_K,
    tune_target_recall: float = TUNE_TARGET_RECALL,
) -> Path:
    """Write a complete bundle to ``bundle_dir`` (replaced atomically-ish via a sibling temp dir).

    Catalogs above ``tune_min_items`` get their index's search parameter tuned to reach
    ``tune_target_recall`` recall@``tune_k`` (:func:`recall_service.index.tune_index`); the chosen
    value goes to the manifest's ``nprobe`` / ``ef_search`` and the measurement to ``index_tuning``.
    """
    import torch

    from recall_service.model import tower_members

    bundle_dir = Path(bundle_dir)
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".recall-", dir=bundle_dir.parent))
    try:
        threads = resolve_threads(config.threads)  # the trainer's: 0 = every core of this host
        torch.set_num_threads(threads)
        export_user_tower(model, staging / ONNX_FILE)
        with torch.no_grad():
            item_vectors = model.all_item_vectors().numpy().astype(np.float32)
        np.save(staging / "item_vectors.npy", item_vectors)
        factory = config.index_factory or default_index_factory(dataset.num_items)
        import faiss

        faiss.omp_set_num_threads(threads)
        index = build_index(item_vectors, factory, seed=config.seed)
        tuning = tune_index(
            index, item_vectors, tune_min_items, k=tune_k, target_recall=tune_target_recall, seed=config.seed
        )
        faiss.write_index(index, str(staging / INDEX_FILE))
        del index
        dataset.items.save(staging / "items.txt")

        catalog = dataset.catalog
        category = (
            np.full(dataset.num_items, -1, np.int64)
            if catalog.category is None
            else np.asarray(catalog.category, dtype=np.int64)
        )
        brand = (
            np.full(dataset.num_items, -1, np.int64)
            if catalog.brand is None
            else np.asarray(catalog.brand, dtype=np.int64)
        )
        bid = (
            np.zeros(dataset.num_items, np.float32)
            if catalog.bid is None
            else np.nan_to_num(np.asarray(catalog.bid, dtype=np.float32))
        )
        covisit, popularity = interaction_tables(
            holdout_sequences(dataset),
            dataset.num_items,
            category,
            len(catalog.category_names),
            covisit_settings(config),
        )
        covisit.save(staging)
        popularity.save(staging)
        np.save(staging / "item_category.npy", category)
        np.save(staging / "item_brand.npy", brand)
        np.save(staging / "item_bid.npy", bid)
        (staging / "categories.txt").write_text(_names_or_empty(catalog.category_names), encoding="utf-8")
        (staging / "brands.txt").write_text(_names_or_empty(catalog.brand_names), encoding="utf-8")

        write_manifest(
            staging,
            BUNDLE_KIND,
            new_version("recall"),
            dataset.fingerprint(),
            dataset=dataset.name,
            dim=int(item_vectors.shape[1]),
            max_length=model.shape.max_length,
            num_items=dataset.num_items,
            scenarios=list(dataset.scenario_names),
            metric="inner_product",
            similarity=model.shape.similarity,
            # models whose vectors sit side by side in item_vectors.npy and the graph's output
            ensemble_members=len(tower_members(model)),
            index_factory=factory,
            **tuning.searcher_settings(config.nprobe, config.ef_search),
            index_tuning=tuning.to_manifest(),
            onnx={
                "file": ONNX_FILE,
                "opset": ONNX_OPSET,
                "inputs": [
                    "items[B,S] int64 (dense+1, 0=pad, left-padded)",
                    "events[B,S] int64",
                    "scenario[B] int64",
                ],
                "outputs": ["user_vectors[B,D] float32" + user_vector_note(model)],
            },
            covisit=covisit_settings(config),
            default_sources=config.default_sources,
            tables_exclude=TABLES_EXCLUDE_TEST,
            train=train_info or {},
            **_item_text_manifest(model),
        )
        if bundle_dir.exists():
            shutil.rmtree(bundle_dir)
        staging.rename(bundle_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("recall bundle written to %s", bundle_dir)
    return bundle_dir


def main(argv: list[str] | None = None) -> int:
    """`recsys export recall --data synthetic|DIR --artifacts DIR [--checkpoint PATH]`: re-export."""
    from recall_service.train import load_checkpoint
    from recsys.data.prepare import dataset_artifacts, prepare_dataset

    parser = argparse.ArgumentParser(prog="recsys export recall", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--quick", action="store_true", help="the quick synthetic data (as trained)")
    parser.add_argument("--checkpoint", type=Path, help="default: artifacts/<name>/checkpoints/recall.pt")
    parser.add_argument("--index-factory", help="Faiss index_factory string ('' = by catalog size)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    dataset = prepare_dataset(args.data, args.artifacts, args.quick)
    artifacts = dataset_artifacts(dataset, args.artifacts)
    checkpoint = args.checkpoint or artifacts / "checkpoints" / "recall.pt"
    if not checkpoint.is_file():
        parser.error(f"no checkpoint at {checkpoint}: run `recsys train recall` first")
    model, config, train_info = load_checkpoint(checkpoint)
    if args.index_factory is not None:
        config.index_factory = args.index_factory
    bundle_dir = export_bundle(model, dataset, artifacts / "recall", config, train_info=train_info)
    print(f"recall bundle: {bundle_dir}")
    return 0
