"""``recsys eval``: offline evaluation of one or more stages under the shared protocol.

Writes ``{"dataset": {...}, "protocol": "...", "phase": ..., "stages": {name: metrics}}`` to
``--out`` and prints that path as the last line of stdout (logs and progress go to stderr).

``popularity`` is computed here and always included. The other stages are plug-ins imported
only when asked for, each ``evaluate_stages(dataset, split, artifacts_dir, phase, quick)`` returning
``{stage: metrics}`` and training with default settings whatever is missing:
``recall``/``covisit``/``candidates`` from ``recall_service.evaluate``, ``pipeline_offline``
(the recall bundle's own mix top-K re-ranked, no rules) from ``rank_service.evaluate`` (which
reports the recall stages too).

``pipeline`` is what the gateway serves for ``home``: the scenario of the scenario file, re-rank
rules included, run by the same compiled scenario (``recsys.app.scenario_eval``); asking for it
reports the recall stages and ``pipeline_offline`` beside it. ``--scenario NAME`` (repeatable)
adds ``"scenarios": {name: metrics}`` for any scenario.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from recsys.app import load_entry
from recsys.data.loaders import DatasetFormatError
from recsys.data.prepare import dataset_artifacts, prepare_dataset
from recsys.data.split import LeaveOneOutSplit
from recsys.evaluation.popularity import evaluate_popularity
from recsys.evaluation.protocol import PROTOCOL

log = logging.getLogger("recsys.eval")

POPULARITY = "popularity"
# stage -> the plug-in ("module:function") that evaluates it.
PLUGINS: dict[str, str] = {
    "recall": "recall_service.evaluate:evaluate_stages",
    "covisit": "recall_service.evaluate:evaluate_stages",
    "candidates": "recall_service.evaluate:evaluate_stages",
    "pipeline_offline": "rank_service.evaluate:evaluate_stages",
    # the served home scenario; its plug-in is SCENARIO_PLUGIN, this one reports the stages it
    # is built on beside it
    "pipeline": "rank_service.evaluate:evaluate_stages",
}
STAGES = (POPULARITY, *PLUGINS)
# ``--scenario`` and ``pipeline``: what a scenario of the scenario file serves, through the
# compiled scenario the gateway runs.
SCENARIO_PLUGIN = "recsys.app.scenario_eval:evaluate"
SERVED_PIPELINE_SCENARIO = "home"


# What the eval JSON's ``training`` block copies from each bundle manifest's ``train`` block.
TRAINING_FIELDS = (
    "stop_reason",
    "epochs_run",
    "best_epoch",
    "train_seconds",
    "threads",
    "processes",
    "device",
    "precision",
    "seed",
    "steps",
    "reduced_thread_steps",
)


def training_records(artifacts_dir: Path) -> dict[str, dict]:
    """How each evaluated bundle was trained (what stopped it, epochs, seconds, threads, seed),
    read from the manifests under ``artifacts_dir``; the ranker's held-out recall bundles too
    (``rank_holdout_recall``, and ``rank_holdout_recall_2``, ... with several training prefixes)."""
    records: dict[str, dict] = {}
    for kind in ("recall", "rank"):
        manifest = artifacts_dir / kind / "manifest.json"
        if not manifest.is_file():
            continue
        train = json.loads(manifest.read_text(encoding="utf-8")).get("train", {})
        records[kind] = {field: train[field] for field in TRAINING_FIELDS if field in train}
        refit = train.get("refit") or {}
        if refit:  # the exported ranker was retrained for the selected epochs with validation lists
            records[kind]["refit_epochs"] = refit["epochs"]
            records[kind]["refit_seconds"] = refit["seconds"]
        held_out_bundles = [train.get("holdout_recall") or {}, *train.get("holdout_recall_earlier", [])]
        for position, holdout in enumerate(held_out_bundles, start=1):
            if holdout:  # the first keeps its name; an earlier prefix's bundle j is "..._j"
                name = "rank_holdout_recall" if position == 1 else f"rank_holdout_recall_{position}"
                records[name] = {field: holdout[field] for field in TRAINING_FIELDS if field in holdout}
    return records


class PluginUnavailableError(RuntimeError):
    """A stage's plug-in module cannot be imported."""


def resolve_plugin(target: str, stage: str) -> Callable[..., dict[str, dict]]:
    """Import ``module:function``; a clear error names the stage when it is not available."""
    try:
        return load_entry(target)
    except ImportError as error:
        raise PluginUnavailableError(
            f"stage {stage!r} is evaluated by {target}, which cannot be imported: {error}"
        ) from error
    except AttributeError:
        module_name, _, function_name = target.partition(":")
        raise PluginUnavailableError(
            f"stage {stage!r}: {module_name} has no function {function_name}()"
        ) from None


def plugins_for(stages: list[str]) -> list[tuple[str, str]]:
    """``(target, first stage)`` of each plug-in to call, once each. The rank plug-in also
    reports the recall stages, so the recall plug-in is skipped when it runs."""
    targets: dict[str, str] = {}
    for stage in stages:
        if stage != POPULARITY:
            targets.setdefault(PLUGINS[stage], stage)
    if PLUGINS["pipeline_offline"] in targets or PLUGINS["pipeline"] in targets:
        targets.pop(PLUGINS["recall"], None)
    return [(target, stage) for target, stage in targets.items()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="recsys eval", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a dataset folder/file")
    parser.add_argument(
        "--stage",
        action="append",
        choices=STAGES,
        dest="stages",
        help="stage to evaluate (repeatable; popularity is always included)",
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path("artifacts"),
        help="artifacts root (default: artifacts)",
    )
    parser.add_argument("--out", type=Path, help="JSON output (default: ARTIFACTS/eval-<stage>.json)")
    parser.add_argument(
        "--scenario",
        action="append",
        dest="scenarios",
        default=[],
        help="evaluate what this scenario of the scenario file SERVES (the gateway's pipeline, re-rank "
        "included, in process); repeatable; JSON key `scenarios`",
    )
    parser.add_argument(
        "--scenarios-file",
        type=Path,
        help="scenario YAML (default: the gateway's shipped config/scenarios.yaml)",
    )
    parser.add_argument("--phase", choices=("test", "valid"), default="test")
    parser.add_argument("--quick", action="store_true", help="quick synthetic data / short training")
    return parser.parse_args(argv)


def run_evaluation(args: argparse.Namespace) -> dict:
    """Evaluate the requested stages; the result is the JSON document ``main`` writes."""
    stages = list(dict.fromkeys(args.stages or [POPULARITY]))
    plugins = [(resolve_plugin(target, stage), target) for target, stage in plugins_for(stages)]

    dataset = prepare_dataset(args.data, args.artifacts, quick=args.quick)
    log.info("dataset %s", json.dumps(dataset.summary()))
    split = LeaveOneOutSplit(dataset)
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    results[POPULARITY] = evaluate_popularity(dataset, split, phase=args.phase, progress=True)
    seconds[POPULARITY] = round(time.perf_counter() - started, 3)
    log.info("popularity %s", json.dumps(results[POPULARITY]))

    for evaluate_stages, target in plugins:
        started = time.perf_counter()
        reported = evaluate_stages(
            dataset, split, dataset_artifacts(dataset, args.artifacts), args.phase, args.quick
        )
        elapsed = round(time.perf_counter() - started, 3)
        for stage, metrics in reported.items():
            results[stage] = dict(metrics)
            seconds[stage] = elapsed
            log.info("%s (%s) %s", stage, target, json.dumps(metrics))
    scenario_names = list(dict.fromkeys(args.scenarios))
    if "pipeline" in stages:
        scenario_names = list(dict.fromkeys([SERVED_PIPELINE_SCENARIO, *scenario_names]))
    served: dict[str, dict] = {}
    if scenario_names:
        evaluate_scenarios = resolve_plugin(SCENARIO_PLUGIN, "scenario")
        started = time.perf_counter()
        served = evaluate_scenarios(
            dataset,
            split,
            dataset_artifacts(dataset, args.artifacts),
            scenario_names,
            args.scenarios_file,
            args.phase,
            args.quick,
        )
        if "pipeline" in stages:  # home, or its first arm (the control) when it runs an experiment
            key = next(k for k in served if k.split("/")[0] == SERVED_PIPELINE_SCENARIO)
            results["pipeline"] = {"scenario": key, **served[key]}
            seconds["pipeline"] = round(time.perf_counter() - started, 3)
    missing = [stage for stage in stages if stage not in results]
    if missing:
        raise RuntimeError(f"plug-ins did not report stage(s) {', '.join(missing)}")
    report = {
        "dataset": dataset.summary(),
        "protocol": PROTOCOL,
        "phase": args.phase,
        "quick": args.quick,
        "stages": results,
        "seconds": seconds,
        "training": training_records(dataset_artifacts(dataset, args.artifacts)) if plugins else {},
    }
    if args.scenarios:
        asked = set(args.scenarios)  # each asked scenario, or each arm of one (``name/arm``)
        report["scenarios"] = {key: metrics for key, metrics in served.items() if key.split("/")[0] in asked}
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:  # `recsys eval report`: the README's quality section
        return int(load_entry("recsys.app.quality_report:main")(argv[1:]) or 0)
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        report = run_evaluation(args)
    except PluginUnavailableError as error:
        print(f"recsys eval: {error}", file=sys.stderr)
        return 2
    except DatasetFormatError as error:
        print(f"recsys eval: {error}", file=sys.stderr)
        return 1
    stages = list(dict.fromkeys(args.stages or [POPULARITY]))
    out = args.out or args.artifacts / f"eval-{'-'.join(stages)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    partial.replace(out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
