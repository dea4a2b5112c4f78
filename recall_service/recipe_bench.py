"""`python -m recall_service.recipe_bench`: seconds per epoch (training steps plus the validation
early stopping runs) of recall training recipes, measured interleaved in one process.

Each recipe is ``name:key=value,...`` over :class:`RecallTrainConfig` fields on top of the default
preset (``recall_service.sweep``'s trial format; ``default:`` alone is the preset). Every recipe
gets its own model, optimizer, weight average and validator, built by the trainer's own
``prepare_training``; round r runs one epoch of each, in turn ABAB / BABA, so that load from other
processes falls on all of them. A whole training costs its epochs (``recsys train recall`` records
them in the bundle manifest) times the epoch seconds printed here.
"""

from __future__ import annotations

import os

# OpenMP waiting, read once when torch loads: the trainers' setting (recsys.training).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.update(OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="10000")

import argparse
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recall_service.sweep import parse_trial
from recall_service.train import RecallTrainConfig, TrainingSetup, prepare_training, train_one_epoch
from recsys.data.split import LeaveOneOutSplit
from recsys.timing import machine_info, report_json
from recsys.training import (
    available_cores,
    averaged_weights,
    configure_threads,
    cpu_has_native_bf16,
    init_distributed,
    resolve_precision,
    reuse_freed_memory,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Recipe:
    """One recipe under test: its config, training state and per-epoch timings."""

    name: str
    config: RecallTrainConfig
    setup: TrainingSetup
    rng: np.random.Generator
    precision: str
    train_seconds: list[float] = dataclasses.field(default_factory=list)
    validation_seconds: list[float] = dataclasses.field(default_factory=list)
    valid_hr10: list[float] = dataclasses.field(default_factory=list)

    def epoch(self) -> None:
        """One training epoch and one validation, each timed."""
        started = time.perf_counter()
        train_one_epoch(
            self.setup.objective,
            self.setup.optimizer,
            self.setup.windows,
            self.config.batch_size,
            self.rng,
            self.setup.average,
            precision=self.precision,
        )
        trained = time.perf_counter()
        with averaged_weights(self.setup.model, self.setup.average):
            valid = self.setup.validator(self.setup.model)
        self.train_seconds.append(trained - started)
        self.validation_seconds.append(time.perf_counter() - trained)
        self.valid_hr10.append(round(valid["HR@10"], 4))

    def summary(self, preset: RecallTrainConfig) -> dict[str, Any]:
        epoch_seconds = [t + v for t, v in zip(self.train_seconds, self.validation_seconds, strict=True)]
        windows = self.setup.windows
        return {
            "overrides": {
                k: v for k, v in dataclasses.asdict(self.config).items() if v != getattr(preset, k)
            },
            "per_prefix_targets": self.config.per_prefix_targets,
            "batch_size": self.config.batch_size,
            "learning_rate": self.config.learning_rate,
            "precision": self.precision,
            "windows": len(windows.lengths),
            "steps_per_epoch": -(-len(windows.lengths) // self.config.batch_size),
            "epoch_seconds": [round(s, 1) for s in epoch_seconds],
            "epoch_seconds_median": round(statistics.median(epoch_seconds), 1),
            "train_seconds": [round(s, 1) for s in self.train_seconds],
            "validation_seconds": [round(s, 1) for s in self.validation_seconds],
            "valid_hr10_by_epoch": self.valid_hr10,
        }


def run_bench(data: Path, recipes: list[str], rounds: int, threads: int) -> dict[str, Any]:
    """Build every recipe, then ``rounds`` interleaved epochs of each; the JSON summary."""
    from recsys.data.loaders import load_dataset

    reuse_freed_memory()
    dataset = load_dataset(data)
    split = LeaveOneOutSplit(dataset)
    context = init_distributed("cpu")
    threads = configure_threads(threads)
    preset = RecallTrainConfig.default()
    built: list[Recipe] = []
    for text in recipes:
        name, overrides = parse_trial(text)
        config = dataclasses.replace(preset, **overrides)
        precision = resolve_precision(config.precision, "cpu")
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        setup = prepare_training(dataset, split, config, context, precision, rng)
        built.append(Recipe(name, config, setup, rng, precision))
    for round_index in range(rounds):
        for recipe in built if round_index % 2 == 0 else built[::-1]:
            recipe.epoch()
            log.info(
                "round %d %s: %.1f s train + %.1f s validation, valid HR@10 %.4f",
                round_index + 1,
                recipe.name,
                recipe.train_seconds[-1],
                recipe.validation_seconds[-1],
                recipe.valid_hr10[-1],
            )
    first = built[0]
    medians = {r.name: statistics.median(np.add(r.train_seconds, r.validation_seconds)) for r in built}
    return {
        "bench": "recall training recipes: seconds per epoch (steps + validation), interleaved",
        "command": "python -m recall_service.recipe_bench " + " ".join(sys.argv[1:]),
        "machine": {
            **machine_info(),
            "cores": available_cores(),
            "threads": threads,
            "native_bf16": cpu_has_native_bf16(),
            "torch": torch.__version__,
        },
        "data": {"name": dataset.name, "users": dataset.num_users, "items": dataset.num_items},
        "rounds": rounds,
        "recipes": {r.name: r.summary(preset) for r in built},
        f"epoch_seconds_ratio_to_{first.name}": {
            r.name: round(medians[r.name] / medians[first.name], 2) for r in built[1:]
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recall_service.recipe_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="dataset folder (e.g. ../shared/data/amazon-beauty)"
    )
    parser.add_argument(
        "--recipe",
        action="append",
        help="name:key=value,... over RecallTrainConfig on the default preset (repeatable; default: "
        "the preset against the all-positions recipe at batch 64)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved epochs per recipe")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    parser.add_argument("--out", type=Path, default=Path("artifacts/bench/recipe-speed.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    recipes = args.recipe or ["default:", "all_positions_b64:per_prefix_targets=false,batch_size=64"]
    report_json(run_bench(args.data, recipes, args.rounds, args.threads), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
