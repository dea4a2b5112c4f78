"""`python -m recall_service.sweep`: train several recall configurations in parallel processes and
print each one's validation (used to choose) and test u2i metrics as JSON.

Each trial is ``name:key=value,key=value`` over :class:`RecallTrainConfig` fields on top of the
default preset, trained in its own process on an even share of the cores (``--parallel`` trials
at once), and scored by the torch user tower over the full catalog under the evaluation protocol.
Choose by validation; the test column is printed so that the note can say what the choice costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from recsys.timing import report_json
from recsys.training import available_cores

SWEEP_KS = (10, 20, 50, 500)


def parse_trial(text: str) -> tuple[str, dict[str, Any]]:
    """``name:key=value,...`` -> (name, overrides) with values typed like the config's fields."""
    from recall_service.train import RecallTrainConfig

    name, _, body = text.partition(":")
    fields = {f.name: f for f in dataclasses.fields(RecallTrainConfig)}
    defaults = RecallTrainConfig()
    overrides: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        if key not in fields:
            raise ValueError(f"trial {name!r}: unknown config field {key!r}")
        current = getattr(defaults, key)
        if isinstance(current, bool):
            overrides[key] = raw.lower() in ("1", "true", "yes")
        else:
            overrides[key] = type(current)(raw)
    return name or "default", overrides


def log_as(trial: str) -> None:
    """Log this process's records under ``trial``'s name (replacing the previous trial's: a pool
    worker runs several trials one after the other)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {trial}: %(message)s", force=True)


def run_trial(data: str, name: str, overrides: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """Train one configuration; its validation and test metrics (u2i over the full catalog)."""
    from recall_service.train import RecallTrainConfig, RecallValidator, train_model
    from recsys.data.loaders import load_dataset
    from recsys.data.split import LeaveOneOutSplit

    log_as(name)
    dataset = load_dataset(Path(data))
    config = dataclasses.replace(RecallTrainConfig.default(), threads=threads, **overrides)
    started = time.perf_counter()
    result = train_model(dataset, config)
    split = LeaveOneOutSplit(dataset)
    valid, test = (
        RecallValidator(dataset, split, split.eval_users, config.max_length, phase)(result.model, SWEEP_KS)
        for phase in ("valid", "test")
    )
    return {
        "trial": name,
        "overrides": overrides,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stop_reason": result.run["stop_reason"],
        "seed": config.seed,
        "train_seconds": round(result.train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "valid": {k: round(v, 4) for k, v in valid.items() if k != "users"},
        "test": {k: round(v, 4) for k, v in test.items() if k != "users"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m recall_service.sweep", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data", required=True, help="dataset folder (e.g. ../shared/data/amazon-beauty)")
    parser.add_argument("--trial", action="append", required=True, help="name:key=value,... (repeat)")
    parser.add_argument("--parallel", type=int, default=2, help="trials at once (sharing the cores evenly)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    trials = [parse_trial(text) for text in args.trial]
    threads = max(1, available_cores() // max(1, min(args.parallel, len(trials))))
    results = []
    with ProcessPoolExecutor(max_workers=args.parallel) as pool:
        futures = {
            pool.submit(run_trial, args.data, name, overrides, threads): name for name, overrides in trials
        }
        for future in as_completed(futures):
            try:
                results.append(future.result())
            except Exception as error:  # one broken trial must not lose the others' results
                results.append({"trial": futures[future], "error": repr(error)})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    results.sort(key=lambda r: -r.get("valid", {}).get("HR@10", -1.0))
    report_json({"sweep": "recall", "data": args.data, "results": results}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
