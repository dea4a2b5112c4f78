"""Cold-item recall with and without item text: `python -m recall_service.text_eval --data synthetic`.

A seeded share of the catalog is made cold: every interaction with those items is removed except
where one is a user's test target (their titles and attributes stay). The two-tower model is then
trained on what remains under four arms that differ only in the item tower (same seed, data,
schedule and early stopping on the warm validation items):

- ``text``: hashed title features; items training never saw are cold-start items (id embedding
  masked to zero, never a training negative: ``unseen_items="cold"``);
- ``no_text``: the same without text (a cold item is its attributes alone);
- ``text_unseen_kept`` / ``no_text_unseen_kept``: with / without text, unseen items like any
  other (own id embedding, a negative in every step; the latter is the model before item text).

Each arm is evaluated under the full-ranking leave-one-out protocol (every item scored, the
user's history excluded, ties against the target, as ``recsys.evaluation.protocol``) on the test
targets: HR@10 / NDCG@10 / HR@50 over the users whose target is a cold item, the others, and all.
The JSON (command, machine, threads, seed, data, per-arm metrics and training record) is written
to ``--out`` and printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from recsys.data.dataset import Dataset
from recsys.data.split import LeaveOneOutSplit
from recsys.timing import report_json

log = logging.getLogger(__name__)

ARMS = {
    "text": {"text": "hash", "unseen_items": "cold"},
    "no_text": {"text": "off", "unseen_items": "cold"},
    "text_unseen_kept": {"text": "hash", "unseen_items": "keep"},
    "no_text_unseen_kept": {"text": "off", "unseen_items": "keep"},
}
KS = (10, 50)


def choose_cold_items(dataset: Dataset, share: float, seed: int) -> np.ndarray:
    """A uniform ``share`` of the items that have a title (sorted dense ids)."""
    titles = dataset.catalog.title or [""] * dataset.num_items
    titled = np.flatnonzero([bool(t and t.strip()) for t in titles])
    count = max(1, round(share * len(titled)))
    rng = np.random.default_rng([seed, 0xC01D])
    return np.sort(rng.choice(titled, size=min(count, len(titled)), replace=False)).astype(np.int64)


def without_cold_interactions(dataset: Dataset, cold: np.ndarray) -> Dataset:
    """``dataset`` with every interaction of a ``cold`` item removed, except users' last (test)
    interactions: training and validation never see a cold item, tests may ask for one."""
    is_cold = np.zeros(dataset.num_items, dtype=bool)
    is_cold[cold] = True
    keeps = []
    for sequence in dataset.sequences:
        keep = ~is_cold[sequence]
        if len(sequence):
            keep[-1] = True
        keeps.append(keep)

    def filtered(rows: list[np.ndarray] | None) -> list[np.ndarray] | None:
        return None if rows is None else [row[keep] for row, keep in zip(rows, keeps, strict=True)]

    return replace(
        dataset,
        name=f"{dataset.name}-cold",
        sequences=filtered(dataset.sequences),
        event_types=filtered(dataset.event_types),
        scenarios=filtered(dataset.scenarios),
        timestamps=filtered(dataset.timestamps),
    )


def evaluate_arm(dataset: Dataset, config, cold: np.ndarray) -> dict:
    """Train one arm and return its cold-target and overall test metrics."""
    from recall_service.train import RecallValidator, train_model
    from recsys.evaluation.protocol import metrics_from_ranks

    result = train_model(dataset, config)
    split = LeaveOneOutSplit(dataset)
    validator = RecallValidator(dataset, split, split.eval_users, config.max_length, phase="test")
    ranks = validator.ranks(result.model)
    cold_target = np.isin(validator.targets.numpy(), cold)
    return {
        "cold": metrics_from_ranks(ranks[cold_target], KS),
        "warm": metrics_from_ranks(ranks[~cold_target], KS),
        "overall": metrics_from_ranks(ranks, KS),
        "train": {
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "best_valid_HR@10": round(result.best_valid["HR@10"], 4),
            "seconds": round(result.train_seconds, 1),
        },
    }


def run(
    data: str, artifacts: Path, quick: bool, share: float, seed: int, threads: int, epochs: int | None
) -> dict:
    from recall_service.train import RecallTrainConfig
    from recsys.data.prepare import prepare_dataset

    dataset = prepare_dataset(data, artifacts, quick)
    if not any(t and t.strip() for t in dataset.catalog.title or []):
        raise SystemExit(f"{dataset.name}: no item has a title; nothing to measure")
    cold = choose_cold_items(dataset, share, seed)
    cold_dataset = without_cold_interactions(dataset, cold)
    split = LeaveOneOutSplit(cold_dataset)
    targets = split.targets(split.eval_users, "test")
    base = RecallTrainConfig.quick() if quick else RecallTrainConfig.default()
    base = replace(base, seed=seed, threads=threads, device="cpu")
    if epochs is not None:
        base.epochs = epochs
    arms = {}
    for name, settings in ARMS.items():
        log.info("arm %s: %s", name, settings)
        arms[name] = {"settings": settings, **evaluate_arm(cold_dataset, replace(base, **settings), cold)}
    return {
        "command": "python -m recall_service.text_eval " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "threads": threads,
        "seed": seed,
        "preset": "quick" if quick else "default",
        "data": dataset.summary(),
        "cold_items": {
            "share": share,
            "items": len(cold),
            "interactions_removed": dataset.num_interactions - cold_dataset.num_interactions,
        },
        "users": {"evaluated": len(targets), "cold_target": int(np.isin(targets, cold).sum())},
        "protocol": "leave-one-out test target, full ranking over every item, history excluded",
        "arms": arms,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recall_service.text_eval", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder with titles")
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument(
        "--quick", action="store_true", help="quick synthetic data and the quick model preset"
    )
    parser.add_argument("--cold-share", type=float, default=0.1, help="share of titled items made cold")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = every core)")
    parser.add_argument("--epochs", type=int, help="most epochs per arm (default: the preset's)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/text-cold.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args.data, args.artifacts, args.quick, args.cold_share, args.seed, args.threads, args.epochs)
    report_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
